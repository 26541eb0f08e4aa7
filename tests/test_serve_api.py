"""`latentloom serve`: real uvicorn servers on free 127.0.0.1 ports, driven as AUTOMATIC1111 clients drive them
(the webuiapi package) and with raw HTTP for what clients should not be able to do."""
import base64
import concurrent.futures
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import webuiapi
from PIL import Image

from latentloom.pipelines.metadata import read_metadata

ALLOWED_ORIGIN = "http://allowed.example:3000"
# the bundled model at 64 px, 2 steps, without CFG (one UNet call a step): a fraction of a second
SMALL = dict(width=64, height=64, steps=2, cfg_scale=1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Running:
    """A uvicorn server in a thread of this process."""

    def __init__(self, outputs: Path, *, preload: bool = True, **settings) -> None:
        import uvicorn

        from latentloom.serve.app import create_app
        from latentloom.serve.settings import ServeSettings

        self.port = free_port()
        self.outputs = outputs
        self.settings = ServeSettings(port=self.port, outputs=outputs, **settings)
        self.app = create_app(self.settings, preload=preload)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        if preload:
            self.app.state.server.ready.result(timeout=60)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, **kwargs):
        return webuiapi.WebUIApi(host="127.0.0.1", port=self.port, sampler="Euler a", steps=4, **kwargs)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.server.queue.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Running(tmp_path_factory.mktemp("outputs"), models=["bundled:default", "bundled:fast"],
                      cors_allow_origins=[ALLOWED_ORIGIN], upscaler="bundled:upscaler",
                      limits=_limits(max_body_mb=2))
    yield running
    running.close()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    running = Running(tmp_path_factory.mktemp("outputs-auth"), api_auth=("alice", "s3cret:pw"))
    yield running
    running.close()


def _limits(**kwargs):
    from latentloom.serve.settings import Limits

    return Limits(**kwargs)


def pngs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def raw(server, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None):
    """One request exactly as written (no client-side path normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{server.port}", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def post(server, path: str, payload, **kwargs):
    return requests.post(server.url + path, json=payload, timeout=120, **kwargs)


def test_txt2img_writes_images_with_recipes_before_answering(server):
    api = server.api()
    before = pngs(server.outputs)
    result = api.txt2img(prompt="a red circle", seed=5, batch_size=2, sampler_name="DPM++ 2M Karras",
                         **{**SMALL, "cfg_scale": 5.0})
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    info = result.info
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "Karras"
    assert len(info["infotexts"]) == 2 and "a red circle" in info["infotexts"][0]
    assert result.parameters["prompt"] == "a red circle" and result.parameters["seed"] == 5
    names = info["latentloom"]["names"]
    assert set(names) == pngs(server.outputs) - before  # on disk by the time the answer came
    recipe = read_metadata(server.outputs / names[0])
    assert (recipe["prompt"], recipe["seed"], recipe["sampler"], recipe["karras_sigmas"]) == (
        "a red circle", 5, "dpmpp_2m", True)
    # the answer's PNG is the file, metadata included; the gallery lists it first, with its recipe
    assert base64.b64decode(result.json["images"][0]) == (server.outputs / names[0]).read_bytes()
    gallery = requests.get(server.url + "/latentloom/gallery", timeout=10).json()
    assert {g["name"] for g in gallery[:2]} == set(names) and gallery[0]["recipe"]["prompt"] == "a red circle"
    got = requests.get(server.url + gallery[0]["url"], timeout=10)
    assert got.status_code == 200 and got.content == (server.outputs / gallery[0]["name"]).read_bytes()


def test_unsupported_fields_are_ignored_with_a_warning(server, caplog):
    response = post(server, "/sdapi/v1/txt2img", {"prompt": "x", "seed": 1, **SMALL, "restore_faces": True,
                                                   "no_such_field": 3, "sampler_name": "k_euler_a"})
    assert response.status_code == 200
    warnings = json.loads(response.json()["info"])["warnings"]
    assert any("restore_faces" in w for w in warnings) and any("no_such_field" in w for w in warnings)


def test_img2img_and_inpaint_with_a_mask(server):
    api = server.api()
    photo = Image.new("RGB", (64, 64), (20, 40, 200))
    photo.paste((250, 250, 0), (0, 0, 32, 64))
    plain = api.img2img(images=[photo], prompt="a yellow square", denoising_strength=0.5, seed=3, **SMALL)
    assert len(plain.images) == 1 and plain.images[0].size == (64, 64)
    assert read_metadata(server.outputs / plain.info["latentloom"]["names"][0])["task"] == "img2img"

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 16, 64, 48))  # white = repaint
    out = api.img2img(images=[photo], mask_image=mask, prompt="a red circle", denoising_strength=1.0, seed=4,
                      **SMALL)
    assert out.info["is_using_inpainting_conditioning"]
    assert any("inpaint_full_res" in w for w in out.info["warnings"])  # webuiapi sends True by default
    image = out.images[0].convert("RGB")
    assert image.getpixel((2, 2)) == photo.getpixel((2, 2))  # outside the mask: the original pixels
    assert image.getpixel((60, 2)) == photo.getpixel((60, 2))
    # inverted: the mask's black part is repainted, so the former repaint area is kept
    inverted = api.img2img(images=[photo], mask_image=mask, inpainting_mask_invert=1, prompt="a red circle",
                           denoising_strength=1.0, seed=4, **SMALL).images[0].convert("RGB")
    assert inverted.getpixel((48, 32)) == photo.getpixel((48, 32))
    # a data: URL prefix is accepted on init_images, as browsers make them
    response = post(server, "/sdapi/v1/img2img", {"init_images": ["data:image/png;base64," + b64(photo)],
                                                   "prompt": "x", **SMALL, "denoising_strength": 0.5})
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["init_images"] is None


def test_listings_options_and_model_switch(server):
    api = server.api()
    samplers = {s["name"]: s["aliases"] for s in api.get_samplers()}
    assert {"DPM++ 2M", "Euler a", "Euler", "DDIM", "UniPC"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]
    assert {s["label"] for s in api.get_schedulers()} >= {"Automatic", "Karras"}
    titles = [m["title"] for m in api.get_sd_models()]
    assert titles == ["bundled:default", "bundled:fast"]
    assert api.get_options()["sd_model_checkpoint"] == "bundled:default"
    # override_settings switches for one request, then the previous model is current again
    out = api.txt2img(prompt="x", seed=1, override_settings={"sd_model_checkpoint": "bundled:fast"},
                      sampler_name="LCM", **SMALL)
    assert out.info["sd_model_name"] == "bundled:fast"
    assert api.get_options()["sd_model_checkpoint"] == "bundled:default"
    try:
        api.set_options({"sd_model_checkpoint": "bundled:fast"})
        assert api.util_get_current_model() == "bundled:fast"
        out = api.txt2img(prompt="a blue square", seed=1, sampler_name="LCM", **SMALL)
        assert out.info["sd_model_name"] == "bundled:fast"
        assert read_metadata(server.outputs / out.info["latentloom"]["names"][0])["model"] == "bundled:fast"
    finally:
        api.set_options({"sd_model_checkpoint": "bundled:default"})
    assert api.get_options()["sd_model_checkpoint"] == "bundled:default"
    bad = requests.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, timeout=10)
    assert bad.status_code == 422 and "bundled:default" in bad.json()["detail"]
    info = requests.get(server.url + "/latentloom/info", timeout=10).json()
    assert info["current_model"] == "bundled:default" and info["upscaler"] is True
    assert info["defaults"]["width"] == 64 and "DPM++ 2M" in info["samplers"]


def _start_long_job(server, task_id: str, steps: int = 150):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(post, server, "/sdapi/v1/txt2img", {"prompt": "a long one", "seed": 2, "width": 64,
                                                            "height": 64, "steps": steps, "force_task_id": task_id})
    pool.shutdown(wait=False)
    return future


def _poll(server, task_id: str, until, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = post(server, "/internal/progress", {"id_task": task_id, "live_preview": True,
                                                    "id_live_preview": -1}).json()
        if until(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"progress never reached the expected state; last: {state}")


def test_progress_preview_and_interrupt_then_the_next_request_works(server):
    api = server.api()
    task = str(uuid.uuid4())
    future = _start_long_job(server, task)
    state = _poll(server, task, lambda s: s["active"] and s["live_preview"])  # a preview comes every few steps
    assert state["live_preview"].startswith("data:image/png;base64,") and 0 < state["progress"] < 1
    assert state["sampling_steps"] == 150 and state["sampling_step"] >= 1
    progress = api.get_progress()
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] >= 1
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (64, 64)
    api.interrupt()
    response = future.result(timeout=60)
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["interrupted"] and response.json()["images"] == []
    assert _poll(server, task, lambda s: s["completed"])["progress"] == 1
    assert len(api.txt2img(prompt="after", seed=1, **SMALL).images) == 1


def test_cancel_a_queued_job_and_a_running_one(server):
    running, queued = str(uuid.uuid4()), str(uuid.uuid4())
    first = _start_long_job(server, running)
    _poll(server, running, lambda s: s["active"])
    second = _start_long_job(server, queued)
    state = _poll(server, queued, lambda s: s["queued"])
    assert state["queue_position"] == 0
    assert post(server, "/latentloom/cancel", {"id_task": queued}).json()["cancelled"] == "queued"
    assert second.result(timeout=60).status_code == 409
    assert post(server, "/latentloom/cancel", {"id_task": running}).json()["cancelled"] == "running"
    assert json.loads(first.result(timeout=60).json()["info"])["interrupted"]
    assert post(server, "/latentloom/cancel", {"id_task": "unknown"}).json()["cancelled"] == "not found"


def test_a_client_that_goes_away_still_gets_its_image_saved(server):
    before = pngs(server.outputs)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.2)
    body = json.dumps({"prompt": "left early", "seed": 9, "width": 64, "height": 64, "steps": 60})
    conn.request("POST", "/sdapi/v1/txt2img", body=body, headers={"Content-Type": "application/json"})
    with pytest.raises((TimeoutError, socket.timeout)):
        conn.getresponse()
    conn.close()
    deadline = time.time() + 60
    while not pngs(server.outputs) - before:
        assert time.time() < deadline, "the abandoned request's image was never written"
        time.sleep(0.1)
    assert len(server.api().txt2img(prompt="still up", seed=1, **SMALL).images) == 1


def test_load_16_requests_from_8_clients(server, capsys):
    before = pngs(server.outputs)

    def one(i):
        return server.api().txt2img(prompt=f"load {i}", seed=100 + i, **SMALL)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    seconds = time.perf_counter() - start
    made = pngs(server.outputs) - before
    assert all(len(r.images) == 1 for r in results) and len(made) == 16
    assert sorted(r.info["seed"] for r in results) == list(range(100, 116))
    with capsys.disabled():
        print(f"\n[serve load] 16 txt2img requests from 8 clients: {seconds:.2f} s, {len(made)} images on disk")


BAD_REQUESTS = [
    ("txt2img", {"prompt": "x", "steps": "many"}, 422, "steps"),
    ("txt2img", {"prompt": "x", "steps": True}, 422, "steps"),
    ("txt2img", {"prompt": "x", "steps": 151}, 422, "[1, 150]"),
    ("txt2img", {"prompt": "x", "width": 4096, "height": 4096}, 422, "--max-pixels"),
    ("txt2img", {"prompt": "x", "width": 60, "height": 64}, 422, "multiple of 8"),
    ("txt2img", {"prompt": "x", "batch_size": 4, "n_iter": 5}, 422, "--max-batch"),
    ("txt2img", {"prompt": "x", "sampler_name": "Wobbly"}, 422, "DPM++ 2M"),
    ("txt2img", {"prompt": "x", "scheduler": "Polyexponential"}, 422, "Karras"),
    ("txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}}, 422, "bundled:fast"),
    ("txt2img", {"prompt": "x", "seed": 2**40}, 422, "seed"),
    ("txt2img", {"prompt": ["not", "a", "string"]}, 422, "prompt"),
    ("txt2img", [1, 2], 422, "body"),
    ("img2img", {"prompt": "x", "init_images": ["@@not base64@@"]}, 422, "init_images[0]"),
    ("img2img", {"prompt": "x", "init_images": [base64.b64encode(b"hello, not an image").decode()]}, 422,
     "init_images[0]"),
    ("img2img", {"prompt": "x"}, 422, "init_images"),
    ("img2img", {"prompt": "x", "init_images": ["IMAGE"], "denoising_strength": 3}, 422, "denoising_strength"),
    ("img2img", {"prompt": "x", "init_images": ["IMAGE"], "mask": "%%%"}, 422, "mask"),
]


@pytest.mark.parametrize("route, payload, status, named", BAD_REQUESTS,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_4xx_naming_the_field(server, route, payload, status, named):
    if isinstance(payload, dict) and payload.get("init_images") == ["IMAGE"]:
        payload = {**payload, "init_images": [b64(Image.new("RGB", (64, 64)))]}
    response = post(server, f"/sdapi/v1/{route}", payload)
    assert response.status_code == status, response.text
    assert named in response.text


def test_malformed_json_oversized_images_and_bodies(server):
    status, _, data = raw(server, "POST", "/sdapi/v1/txt2img", body=b'{"prompt": "x", "steps": ',
                          headers={"Content-Type": "application/json"})
    assert status == 422 and b"json" in data.lower()
    big = b64(Image.new("RGB", (2100, 2100)))  # 4.4 M pixels: over 4 x --max-pixels, a few KB of PNG
    response = post(server, "/sdapi/v1/img2img", {"prompt": "x", "init_images": [big], **SMALL})
    assert response.status_code == 413 and "--max-pixels" in response.text
    bomb = b64(Image.new("L", (3000, 3000)))  # over twice PIL's MAX_IMAGE_PIXELS: DecompressionBombError
    response = post(server, "/sdapi/v1/png-info", {"image": bomb})
    assert response.status_code == 413 and "image" in response.text
    response = post(server, "/sdapi/v1/txt2img", {"prompt": "x" * (3 * 1024 * 1024)})
    assert response.status_code == 413 and "--max-body-mb" in response.text
    assert len(server.api().txt2img(prompt="fine", seed=1, **SMALL).images) == 1


def test_png_info_reads_back_a_generated_image(server):
    out = server.api().txt2img(prompt="a green star", negative_prompt="blurry", seed=11, **SMALL)
    info = post(server, "/sdapi/v1/png-info", {"image": out.json["images"][0]}).json()
    assert info["info"].startswith("a green star")
    assert "latentloom" in info["items"]
    assert info["parameters"]["Prompt"] == "a green star" and info["parameters"]["Negative prompt"] == "blurry"


def test_outputs_serves_only_files_inside_the_folder(server, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (server.outputs / "link.png").symlink_to(secret)
    sub = server.outputs / "sub"
    sub.mkdir()
    Image.new("RGB", (8, 8)).save(sub / "inner.png")
    for path in ["/outputs/..%2F..%2Fetc%2Fpasswd", "/outputs/../../etc/passwd", "/outputs/%2Fetc%2Fpasswd",
                 "/outputs//etc/passwd", f"/outputs/{secret}", "/outputs/link.png", "/outputs/sub/inner.png",
                 "/outputs/sub%2Finner.png", "/outputs/.%2e/.%2e/etc/passwd", "/static/..%2F..%2Fapp.py",
                 "/static/../app.py", "/outputs/missing.png"]:
        status, _, data = raw(server, "GET", path)
        assert status == 404, (path, status, data[:100])
    names = [g["name"] for g in requests.get(server.url + "/latentloom/gallery", timeout=10).json()]
    assert "link.png" not in names and "inner.png" not in names


def test_foreign_host_headers_are_refused(server):
    for host in ("evil.example", f"evil.example:{server.port}", f"127.0.0.1:{server.port + 1}", "localhost.:1"):
        status, _, data = raw(server, "GET", "/sdapi/v1/options", headers={"Host": host})
        assert status == 400 and b"Host" in data, host
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert raw(server, "GET", "/sdapi/v1/options", headers={"Host": host})[0] == 200, host


def test_cors_headers_only_for_the_allowed_origins(server, auth_server):
    response = requests.get(server.url + "/sdapi/v1/samplers", headers={"Origin": ALLOWED_ORIGIN}, timeout=10)
    assert response.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN
    response = requests.get(server.url + "/sdapi/v1/samplers", headers={"Origin": "http://evil.example"},
                            timeout=10)
    assert "access-control-allow-origin" not in response.headers
    preflight = requests.options(server.url + "/sdapi/v1/txt2img", timeout=10, headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    response = requests.get(auth_server.url + "/sdapi/v1/samplers", headers={"Origin": ALLOWED_ORIGIN},
                            auth=("alice", "s3cret:pw"), timeout=10)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_api_auth_guards_every_route(auth_server):
    for path in ("/", "/sdapi/v1/options", "/latentloom/gallery", "/outputs/x.png", "/static/app.js"):
        status, headers, _ = raw(auth_server, "GET", path)
        assert status == 401 and headers.get("www-authenticate", "").startswith("Basic"), path
    wrong = requests.get(auth_server.url + "/sdapi/v1/options", auth=("alice", "nope"), timeout=10)
    assert wrong.status_code == 401
    api = auth_server.api(username="alice", password="s3cret:pw")
    assert len(api.txt2img(prompt="private", seed=1, **SMALL).images) == 1
    with pytest.raises(RuntimeError, match="401"):
        auth_server.api().txt2img(prompt="x", **SMALL)
    # no upscaler on this server: the page's upscale button gets 409
    name = requests.get(auth_server.url + "/latentloom/gallery", auth=("alice", "s3cret:pw"), timeout=10).json()
    response = requests.post(auth_server.url + "/latentloom/upscale", json={"name": name[0]["name"]},
                             auth=("alice", "s3cret:pw"), timeout=10)
    assert response.status_code == 409 and "--upscaler" in response.text


def test_upscale_a_gallery_image(server):
    out = server.api().txt2img(prompt="a red circle", seed=3, **SMALL)
    name = out.info["latentloom"]["names"][0]
    response = post(server, "/latentloom/upscale", {"name": name, "steps": 2})
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert image.size == (128, 128)
    new = json.loads(response.json()["info"])["latentloom"]["names"][0]
    assert read_metadata(server.outputs / new)["task"] == "upscale"
    assert post(server, "/latentloom/upscale", {"name": "../etc/passwd"}).status_code == 404


def test_a_restarted_server_shows_the_earlier_gallery(server):
    earlier = [g["name"] for g in requests.get(server.url + "/latentloom/gallery", timeout=10).json()]
    assert earlier
    again = Running(server.outputs, preload=False)
    try:
        names = [g["name"] for g in requests.get(again.url + "/latentloom/gallery", timeout=10).json()]
        assert names[: len(earlier)] == earlier or set(earlier) <= set(names)
    finally:
        again.close()


def test_host_and_sampler_names_parse():
    from latentloom.serve.names import resolve_sampler, resolve_scheduler
    from latentloom.serve.security import split_host

    assert split_host("[::1]:7860") == ("::1", 7860) and split_host("LocalHost") == ("localhost", None)
    with pytest.raises(ValueError):
        split_host("host:port")
    assert resolve_sampler("k_dpmpp_2m")[0].sampler == "dpmpp_2m"
    assert resolve_sampler("DPM++ 2M Karras") == (resolve_sampler("DPM++ 2M")[0], "karras")
    assert resolve_sampler("euler_a")[0].name == "Euler a" and resolve_scheduler("automatic") is None
    with pytest.raises(LookupError, match="Euler a"):
        resolve_sampler("k_lms")


def test_cli_serve_starts_on_the_bundled_model(tmp_path, capsys):
    """`latentloom serve` as a user starts it: time from launch to the first image."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "latentloom", "serve", "--port", str(port), "--outputs",
                                str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=4)
        deadline = time.time() + 90
        while True:
            try:
                result = api.txt2img(prompt="first", seed=1, width=64, height=64)
                break
            except requests.ConnectionError:
                assert time.time() < deadline and process.poll() is None, process.stdout.read().decode()
                time.sleep(0.1)
        seconds = time.perf_counter() - start
        assert len(result.images) == 1 and len(list((tmp_path / "out").glob("*.png"))) == 1
    finally:
        process.terminate()
        process.wait(timeout=20)
    with capsys.disabled():
        print(f"\n[serve start] launch to first txt2img image: {seconds:.2f} s")


def test_a_foreign_page_cannot_post_even_a_simple_request(server):
    """CSRF: a page elsewhere can send a text/plain POST without a preflight; the Origin check refuses it,
    while the server's own page and the allowed origin pass."""
    body = json.dumps({"sd_model_checkpoint": "bundled:default"})
    for origin in ("http://evil.example", "null", "http://localhost:1"):
        response = requests.post(server.url + "/sdapi/v1/options", data=body, timeout=10,
                                 headers={"Content-Type": "text/plain", "Origin": origin})
        assert response.status_code == 403 and origin.lower() in response.json()["detail"], origin
    own = f"http://127.0.0.1:{server.port}"
    for origin in (own, ALLOWED_ORIGIN):
        response = requests.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "bundled:default"},
                                 headers={"Origin": origin}, timeout=10)
        assert response.status_code == 200, (origin, response.text)
