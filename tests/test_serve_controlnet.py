"""`latentloom serve`'s ControlNet: sd-webui-controlnet's routes and its units in txt2img / img2img's
alwayson_scripts, on a real uvicorn server with the bundled model and the bundled ControlNet (64 px, 8 steps),
driven with raw JSON and with the webuiapi client's ControlNetUnit."""
import base64
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import requests
from PIL import Image

from latentloom.evaluation.control_following import map_mask, mask_iou, shape_mask
from latentloom.pipelines.metadata import read_metadata
from latentloom.synthetic.shapes import SceneSpec, ShapeSpec, render_control_map
from latentloom.weights import bundled_controlnet_dir
from test_serve_api import Running  # a uvicorn server in a thread, ServeSettings as keywords

SMALL = dict(width=64, height=64, steps=8)
# the map says left, the prompt says right: where the shape lands tells which one steered it
LEFT = render_control_map(SceneSpec(shapes=(ShapeSpec("square", "white", "large", "left"),)))
PROMPT = "a large cyan square on the right of a black background"
FOLDER_STEM = "shapes_cn"  # the bundled ControlNet copied to a folder of this name, served with --controlnet


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets") / FOLDER_STEM
    shutil.copytree(bundled_controlnet_dir(), folder)
    running = Running(tmp_path_factory.mktemp("outputs"), controlnets=[str(folder)],
                      models=["bundled:default", "bundled:fast", "bundled:upscaler"])
    yield running
    running.close()


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(server, path: str, payload, **kwargs):
    return requests.post(server.url + path, json=payload, timeout=120, **kwargs)


def unit(**fields):
    return {"image": b64(LEFT), "model": "bundled:controlnet", "module": "none", **fields}


def iou(image) -> float:
    return mask_iou(shape_mask(image), map_mask(LEFT))


def bundled_name() -> str:
    digest = hashlib.sha256((bundled_controlnet_dir() / "diffusion_pytorch_model.safetensors").read_bytes())
    return f"bundled:controlnet [{digest.hexdigest()[:8]}]"


@pytest.fixture
def run(server):
    """txt2img / img2img that also hand back the recipe written with the image."""

    def go(path="/sdapi/v1/txt2img", payload=None):
        response = post(server, path, payload)
        assert response.status_code == 200, response.text
        body = response.json()
        info = json.loads(body["info"])
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
        return image, info, read_metadata(server.outputs / info["latentloom"]["names"][0])

    return go


def payload(*units, prompt=PROMPT, seed=0, **fields):
    body = {"prompt": prompt, "seed": seed, **SMALL, **fields}
    if units:
        body["alwayson_scripts"] = {"controlnet": {"args": list(units)}}
    return body


def test_listings_name_the_controlnets_with_their_hash(server):
    models = requests.get(server.url + "/controlnet/model_list", timeout=10).json()["model_list"]
    assert models[1] == bundled_name()
    assert re.fullmatch(FOLDER_STEM + r" \[[0-9a-f]{8}\]", models[0])  # the folder's stem, the same weights' hash
    assert models[0].endswith(bundled_name()[-10:])
    assert requests.get(server.url + "/controlnet/module_list", timeout=10).json() == {"module_list": ["none",
                                                                                                         "canny"]}
    assert requests.get(server.url + "/controlnet/version", timeout=10).json()["version"] == 2
    assert "controlnet" in requests.get(server.url + "/sdapi/v1/scripts", timeout=10).json()["txt2img"]
    # behind the same Host check as every route
    response = requests.get(server.url + "/controlnet/model_list", headers={"Host": "evil.example"}, timeout=10)
    assert response.status_code == 400


def test_the_unit_puts_the_shape_where_the_map_is_and_a_later_request_runs_without_it(server, run):
    image, info, recipe = run(payload=payload(unit(model=bundled_name())))
    assert iou(image) >= 0.5, f"IoU with the map {iou(image):.2f}"
    assert not any("controlnet" in w.lower() for w in info["warnings"]), info["warnings"]
    (net,) = recipe["controlnets"]
    assert (net["model"], net["scale"], net["start"], net["end"]) == ("bundled:controlnet", 1.0, 0.0, 1.0)
    assert recipe["guess_mode"] is False
    assert f"ControlNet 0: \"Module: none, Model: {bundled_name()}" in info["infotexts"][0]
    # the same seed without the unit: the prompt's "right" wins, and the recipe records no ControlNet
    plain, _, recipe = run(payload=payload())
    assert iou(plain) < 0.3 and "controlnets" not in recipe
    gallery = requests.get(server.url + "/latentloom/gallery", timeout=10).json()
    assert "controlnets" not in gallery[0]["recipe"] and gallery[1]["recipe"]["controlnets"][0]["scale"] == 1.0


def test_a_served_folder_the_bare_name_and_several_units(server, run):
    two = [unit(model=FOLDER_STEM, weight=0.6, guidance_end=0.8),
           unit(weight=0.5, guidance_start=0.1, control_mode="ControlNet is more important"),
           unit(enabled=False, model="no such thing", image="@@")]  # a disabled unit is not even read
    two[0]["control_mode"] = 2  # sd-webui-controlnet's index for "ControlNet is more important"
    image, info, recipe = run(payload=payload(*two))
    assert iou(image) >= 0.5
    first, second = recipe["controlnets"]
    assert Path(first["model"]).name == FOLDER_STEM and (first["scale"], first["end"]) == (0.6, 0.8)
    assert (second["model"], second["scale"], second["start"]) == ("bundled:controlnet", 0.5, 0.1)
    assert recipe["guess_mode"] is True
    assert f"Model: {FOLDER_STEM} [" in info["infotexts"][0]


def test_canny_and_img2img_with_the_init_image_as_the_map(server, run):
    _, info, recipe = run(payload=payload(unit(module="canny", threshold_a=50, threshold_b=150)))
    assert len(recipe["controlnets"]) == 1
    photo = Image.new("RGB", (64, 64), (0, 0, 0))
    photo.paste((255, 255, 255), (4, 12, 34, 52))
    # no image in the unit: the extension reads img2img's own image
    body = payload({"model": "bundled:controlnet", "module": "canny", "image": ""}, init_images=[b64(photo)],
                   denoising_strength=0.6)
    _, info, recipe = run("/sdapi/v1/img2img", body)
    assert recipe["task"] == "img2img" and len(recipe["controlnets"]) == 1
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    _, info, recipe = run("/sdapi/v1/img2img", {**body, "mask": b64(mask), "alwayson_scripts": {
        "controlnet": {"args": [unit(weight=0.7)]}}})
    assert recipe["task"] == "inpaint" and recipe["controlnets"][0]["scale"] == 0.7


def test_fields_not_acted_on_are_listed_in_the_warnings(server, run):
    extra = unit(low_vram=True, mask="abc", guessmode=True, no_such_field=1, pixel_perfect=False,
                 processor_res=512, module="canny", resize_mode="Crop and Resize", hr_option="Both",
                 control_mode="My prompt is more important")
    body = payload(extra)
    body["alwayson_scripts"]["adetailer"] = {"args": []}
    _, info, recipe = run(payload=body)
    warnings = "\n".join(info["warnings"])
    for named in ("args[0].low_vram", "args[0].mask", "args[0].guessmode", "args[0].no_such_field",
                  "args[0].processor_res", "My prompt is more important", "alwayson_scripts.adetailer"):
        assert named in warnings, named
    assert "resize_mode" not in warnings and "hr_option" not in warnings and "pixel_perfect" not in warnings
    assert recipe["guess_mode"] is False  # "My prompt is more important" ran as Balanced


BAD_UNITS = [
    (dict(model="control_v11p_sd15_depth [deadbeef]"), "model", ["control_v11p_sd15_depth", bundled_name()]),
    (dict(model="None"), "model", ["'None'", "enabled"]),
    (dict(model=""), "model", ["enabled"]),
    (dict(module="depth_midas"), "module", ["depth_midas", "canny"]),
    (dict(image=b64(Image.new("RGB", (32, 32)))), "image", ["32x32", "64x64", "resize"]),
    (dict(image="@@not base64@@"), "image", ["base64"]),
    (dict(image=base64.b64encode(b"not an image").decode()), "image", ["PIL"]),
    (dict(image=""), "image", ["no control image"]),
    (dict(weight="strong"), "weight", ["number"]),
    (dict(guidance_start=0.9, guidance_end=0.2), "guidance_start", ["0.2"]),
    (dict(control_mode="Loud"), "control_mode", ["Balanced"]),
    (dict(module="canny", threshold_a=250, threshold_b=10), "args[0]", ["low threshold"]),
    (dict(enabled="yes"), "enabled", ["true or false"]),
]


@pytest.mark.parametrize("fields, named, mentions", BAD_UNITS, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_UNITS)])
def test_a_bad_unit_gets_a_422_naming_the_field(server, fields, named, mentions):
    response = post(server, "/sdapi/v1/txt2img", payload(unit(**fields)))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "alwayson_scripts.controlnet.args[0]" in detail and named in detail, detail
    for text in mentions:
        assert text in detail, (text, detail)


def test_requests_the_units_cannot_be_read_from(server):
    for scripts in ({"controlnet": {"args": "x"}}, {"controlnet": [1]}, {"controlnet": {"args": [5]}}):
        response = post(server, "/sdapi/v1/txt2img", {**payload(), "alwayson_scripts": scripts})
        assert response.status_code == 422 and "alwayson_scripts.controlnet" in response.text, response.text
    mixed = payload(unit(), unit(control_mode="ControlNet is more important"))
    response = post(server, "/sdapi/v1/txt2img", mixed)
    assert response.status_code == 422 and "ControlNet is more important" in response.text
    # a size left out takes the map's; one given must match it, in the job as before it
    response = post(server, "/sdapi/v1/txt2img", {**payload(unit(image=b64(Image.new("RGB", (32, 32))))),
                                                  "width": None, "height": None})
    assert response.status_code == 200 and json.loads(response.json()["info"])["width"] == 32


def test_model_switching_and_a_controlnet_that_does_not_fit(server, run):
    body = payload(unit(), override_settings={"sd_model_checkpoint": "bundled:fast"}, sampler_name="LCM", steps=4)
    image, info, recipe = run(payload=body)
    assert info["sd_model_name"] == "bundled:fast" and recipe["controlnets"][0]["model"] == "bundled:controlnet"
    response = post(server, "/sdapi/v1/txt2img", payload(unit(), override_settings={
        "sd_model_checkpoint": "bundled:upscaler"}))
    assert response.status_code == 422 and "ControlNet bundled:controlnet reads" in response.text, response.text
    image, info, recipe = run(payload=payload(unit()))  # back on the default model, with its ControlNet
    assert info["sd_model_name"] == "bundled:default" and iou(image) >= 0.5


def test_the_webuiapi_client_controlnet_unit(server):
    import webuiapi
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", steps=8)
    assert bundled_name() in api.controlnet_model_list()
    assert api.controlnet_module_list() == ["none", "canny"] and api.controlnet_version() == 2
    cn = webuiapi.ControlNetUnit(image=LEFT, module="none", model=bundled_name())
    out = api.txt2img(prompt=PROMPT, seed=0, width=64, height=64, cfg_scale=5.0, controlnet_units=[cn])
    assert iou(out.image.convert("RGB")) >= 0.5
    assert not any("controlnet" in w.lower() for w in out.info["warnings"]), out.info["warnings"]
    assert out.parameters["alwayson_scripts"]["ControlNet"]["args"][0]["image"] is None  # not echoed
    edges = webuiapi.ControlNetUnit(image=LEFT, module="canny", model="bundled:controlnet", pixel_perfect=True)
    out = api.img2img(images=[LEFT], prompt=PROMPT, seed=0, width=64, height=64, denoising_strength=0.5,
                      controlnet_units=[edges])
    assert read_metadata(server.outputs / out.info["latentloom"]["names"][0])["controlnets"]


def test_api_auth_covers_the_controlnet_routes(tmp_path):
    running = Running(tmp_path, preload=False, api_auth=("alice", "pw"))
    try:
        assert requests.get(running.url + "/controlnet/model_list", timeout=10).status_code == 401
        ok = requests.get(running.url + "/controlnet/model_list", auth=("alice", "pw"), timeout=10)
        assert ok.json() == {"model_list": [bundled_name()]}
    finally:
        running.close()


def test_cli_refuses_a_controlnet_that_is_not_there(tmp_path, capsys):
    from latentloom.cli import main

    (tmp_path / "notes.txt").write_text("x")
    for path in (str(tmp_path / "missing"), str(tmp_path / "notes.txt"), "bundled:canny"):
        assert main(["serve", "--controlnet", path, "--outputs", str(tmp_path / "out")]) == 2
        assert path in capsys.readouterr().err
