"""The page of `latentloom serve` in a real browser: Debian's headless Chromium driven by selenium, against
a real server (a `latentloom serve` subprocess on the bundled model).

One test walks what a user does: type a prompt, Generate, see the image arrive and appear in the gallery,
open its recipe, download the PNG (the recipe is in its text chunks), load its settings back, send it to
img2img, paint a mask and inpaint. Another paints a control map in the Control map panel (the bundled ControlNet)
and sees the shape land where it is painted, and saves demo/serve-page.png (the README shows it); a third checks
that a server without ControlNets shows no such panel.

Chromium and chromedriver come from Debian (`apt-get install chromium chromium-driver`; .ci/run installs
them). Without them the test fails rather than skips, so CI cannot pass without running it.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "demo" / "serve-page.png"
PROMPT = "a red circle on a blue background"
STEPS = 8  # few steps: the bundled model is tiny, and the page is under test, not the sampler
SERVER_START_S = 180  # importing torch and loading the model on a busy 2-core machine
JOB_S = 180


def _require_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: the browser test needs Debian's Chromium "
                    "(`apt-get install -y chromium chromium-driver`; .ci/run installs them)", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed: `pip install selenium` (it is in the dev extra)", pytrace=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@contextlib.contextmanager
def _serve(tmp: Path, *args: str):
    """Base URL of a `latentloom serve` subprocess (with `args`) writing into tmp/outputs."""
    outputs = tmp / "outputs"
    port = _free_port()
    log_path = tmp / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "latentloom", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--outputs", str(outputs), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"latentloom serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                _get(f"{base}/latentloom/info")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"latentloom serve did not answer in {SERVER_START_S} s:\n"
                                f"{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The bundled model (which comes with the bundled ControlNet) and the bundled upscaler."""
    _require_browser()
    with _serve(tmp_path_factory.mktemp("serve"), "--upscaler", "bundled:upscaler") as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str, timeout: float = JOB_S):
    """Wait for `condition(driver)` to be truthy; on timeout say what was awaited and what the page shows."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        jobs = driver.find_element("id", "jobs").text
        errors = driver.find_element("id", "errors").text
        pytest.fail(f"timed out after {timeout} s waiting for {what}; jobs: {jobs!r}; errors: {errors!r}")


def _set(driver, element_id: str, value) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(str(value))


def _finished_cards(driver) -> list:
    return [card for card in driver.find_elements("css selector", "#jobs .job") if "running" not in
            card.get_attribute("class")]


def _save_screenshot(driver) -> None:
    """The page as the README shows it, as a small palette PNG."""
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot.quantize(colors=128).save(SCREENSHOT, optimize=True)


def test_page_generates_shows_gallery_and_inpaints(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver = browser
    driver.get(server + "/")
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1",
          "the page to load the server's settings", timeout=60)
    assert driver.find_element("id", "errors").text == ""
    info = json.loads(_get(f"{server}/latentloom/info"))
    samplers = [o.get_attribute("value") for o in driver.find_elements("css selector", "#sampler_name option")]
    assert samplers == info["samplers"]
    # every form control is labelled, every button says what it does
    for control in driver.find_elements("css selector", "input, select, textarea"):
        control_id = control.get_attribute("id")
        labelled = control.get_attribute("aria-label") or (
            control_id and driver.find_elements("css selector", f'label[for="{control_id}"]'))
        assert labelled, f"unlabelled control {control.get_attribute('outerHTML')}"
    for button in driver.find_elements("css selector", "button"):
        assert button.get_attribute("textContent").strip(), button.get_attribute("outerHTML")

    # txt2img: type a prompt, fix seed and steps, press Generate
    _set(driver, "prompt", PROMPT)
    _set(driver, "seed", 7)
    _set(driver, "steps", STEPS)
    driver.find_element("id", "generate").click()
    _wait(driver, lambda d: d.find_elements("css selector", "#jobs .job-result"), "the generated image")
    card = _finished_cards(driver)[0]
    assert "Done" in card.find_element("css selector", ".job-status").text
    assert driver.find_element("id", "errors").text == ""

    gallery = json.loads(_get(f"{server}/latentloom/gallery"))
    assert len(gallery) == 1
    name = gallery[0]["name"]
    tile_img = f'#gallery img[src$="/outputs/{name}"]'
    _wait(driver, lambda d: d.find_elements("css selector", tile_img), "the image in the gallery", timeout=30)
    _save_screenshot(driver)

    # the gallery tile opens the recipe; the download link is the PNG itself, recipe included
    driver.find_element("css selector", tile_img).click()
    _wait(driver, lambda d: d.find_element("id", "details").get_attribute("open") is not None, "the details")
    assert PROMPT in driver.find_element("id", "details-recipe").text
    link = driver.find_element("id", "details-download")
    assert link.get_attribute("download") == name
    assert link.get_attribute("href") == f"{server}/outputs/{name}"
    with Image.open(io.BytesIO(_get(link.get_attribute("href")))) as png:
        assert png.format == "PNG"
        recipe = json.loads(png.text["latentloom"])
    assert recipe["prompt"] == PROMPT and recipe["seed"] == 7 and recipe["num_inference_steps"] == STEPS
    assert PROMPT in png.text["parameters"]

    # "Use these settings" puts the recipe back into the form
    driver.find_element("id", "details-close").click()
    _set(driver, "prompt", "something else")
    _set(driver, "steps", 30)
    driver.find_element("css selector", tile_img).click()
    driver.find_element("id", "details-use").click()
    assert driver.find_element("id", "prompt").get_attribute("value") == PROMPT
    assert driver.find_element("id", "steps").get_attribute("value") == str(STEPS)

    # send it to img2img, paint a mask with the mouse, inpaint
    driver.find_element("css selector", tile_img).click()
    driver.find_element("id", "details-img2img").click()
    _wait(driver, lambda d: "empty" not in d.find_element("id", "canvas-wrap").get_attribute("class"),
          "the input image on the canvas", timeout=30)
    assert driver.find_element("id", "mode-img2img").is_selected()
    canvas = driver.find_element("id", "mask-canvas")
    (ActionChains(driver).move_to_element_with_offset(canvas, -60, -40).click_and_hold()
     .move_by_offset(60, 0).move_by_offset(60, 0).move_by_offset(0, 50).release().perform())
    mask_b64 = driver.execute_script("return maskEditor.exportMask();")
    assert mask_b64, "painting on the canvas left no mask"
    with Image.open(io.BytesIO(base64.b64decode(mask_b64))) as mask:
        assert mask.size == (recipe["width"], recipe["height"])  # the input image's size
        values = np.unique(np.asarray(mask.convert("L"))).tolist()
    assert values == [0, 255], "the mask is black (keep) and white (repaint), and the stroke covers part of it"
    _set(driver, "prompt", "a large yellow star in the center of a black background")
    driver.find_element("id", "prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter generates
    _wait(driver, lambda d: len(_finished_cards(d)) == 2 and d.find_elements("css selector", "#jobs .job-result"),
          "the inpainted image")
    newest = _finished_cards(driver)[0]
    assert newest.find_element("css selector", ".job-title").text.startswith("inpaint")
    assert "Done" in newest.find_element("css selector", ".job-status").text, newest.text
    gallery = json.loads(_get(f"{server}/latentloom/gallery"))
    assert len(gallery) == 2 and gallery[1]["name"] == name  # newest first
    _wait(driver, lambda d: len(d.find_elements("css selector", "#gallery img")) == 2, "both images in the gallery")
    assert driver.find_element("id", "errors").text == ""

    # Upscale on a gallery tile (the server was started with an upscaler, so the page offers it)
    driver.find_element("css selector", f'#gallery .tile-upscale[aria-label="Upscale {gallery[0]["name"]}"]').click()
    _wait(driver, lambda d: len(_finished_cards(d)) == 3, "the upscaled image")
    newest = _finished_cards(driver)[0]
    assert newest.find_element("css selector", ".job-title").text.startswith("upscale")
    assert "Done" in newest.find_element("css selector", ".job-status").text, newest.text
    gallery = json.loads(_get(f"{server}/latentloom/gallery"))
    assert len(gallery) == 3
    with Image.open(io.BytesIO(_get(server + gallery[0]["url"]))) as big:
        assert big.width > recipe["width"] and big.height > recipe["height"]
    _wait(driver, lambda d: len(d.find_elements("css selector", "#gallery img")) == 3,
          "the upscaled image in the gallery")

    # a request the server refuses shows its reason, not nothing
    driver.find_element("css selector", 'label[for="mode-txt2img"]').click()
    _set(driver, "steps", info["limits"]["max_steps"] + 1)
    driver.find_element("id", "generate").click()
    _wait(driver, lambda d: d.find_element("id", "errors").text, "the server's error on the page", timeout=60)
    assert "steps" in driver.find_element("id", "errors").text

    # no script errors (failed requests the page reported itself are logged by Chromium too)
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert not problems, problems


def _map_of(b64_png: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(b64_png))) as image:
        return image.convert("RGB")


def _centroid_x(mask: np.ndarray) -> float:
    assert mask.any(), "no shape found"
    return float(np.nonzero(mask)[1].mean())


def test_control_map_panel_puts_the_shape_where_it_is_painted(server, browser, tmp_path):
    """The Control map panel: paint white on the left, the prompt says right, the shape lands left; with "use"
    off the next image runs without the ControlNet; the server's refusal shows; a loaded image is scaled to the
    output's size; img2img sends the unit too."""
    from selenium.webdriver.common.action_chains import ActionChains

    from latentloom.evaluation.control_following import map_mask, mask_iou, shape_mask
    from latentloom.synthetic.shapes import SceneSpec, ShapeSpec, render_control_map

    driver = browser
    driver.get(server + "/")  # a fresh page: the other test leaves its form and errors behind
    _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1",
          "the page to load the server's settings", timeout=60)
    models = json.loads(_get(f"{server}/controlnet/model_list"))["model_list"]
    assert models, "the bundled model comes with the bundled ControlNet"
    panel = driver.find_element("id", "control-panel")
    assert panel.is_displayed() and not driver.find_element("id", "control-fields").get_property("disabled")
    assert [o.get_attribute("value") for o in driver.find_elements("css selector", "#control-model option")] == models
    modules = json.loads(_get(f"{server}/controlnet/module_list"))["module_list"]
    assert [o.get_attribute("value") for o in driver.find_elements("css selector", "#control-module option")] == modules
    use = driver.find_element("id", "control-use")
    assert not use.is_selected(), "the map is only sent when asked for"
    driver.find_element("css selector", "#control-panel summary").click()
    canvas = driver.find_element("id", "control-canvas")
    assert canvas.is_displayed()
    assert driver.execute_script("const c = arguments[0]; return [c.width, c.height];", canvas) == [64, 64]

    # a filled block on the left: two strokes down and up with a big brush
    driver.execute_script("const r = document.getElementById('control-brush-size'); r.value = 16;"
                          "r.dispatchEvent(new Event('input'));")
    scale = canvas.size["width"] / 64  # CSS px per map px; offsets are from the canvas's centre
    (ActionChains(driver).move_to_element_with_offset(canvas, round(-20 * scale), round(-10 * scale))
     .click_and_hold().move_by_offset(0, round(20 * scale)).move_by_offset(round(8 * scale), 0)
     .move_by_offset(0, round(-20 * scale)).release().perform())
    painted = map_mask(_map_of(driver.execute_script("return controlMap.exportMap();")))
    assert painted.sum() > 200 and not painted[:, 32:].any(), "the block is on the left half only"

    _set(driver, "prompt", "a large cyan square on the right of a black background")
    _set(driver, "seed", 0)
    _set(driver, "steps", STEPS)
    use.click()
    driver.find_element("id", "generate").click()
    _wait(driver, lambda d: len(_finished_cards(d)) == 1, "the image made with the control map")
    card = _finished_cards(driver)[0]
    assert card.find_element("css selector", ".job-title").text.startswith("txt2img + ControlNet")
    assert "Done" in card.find_element("css selector", ".job-status").text, card.text
    newest = json.loads(_get(f"{server}/latentloom/gallery"))[0]
    (net,) = newest["recipe"]["controlnets"]
    assert net["model"] == "bundled:controlnet" and (net["scale"], net["start"], net["end"]) == (1.0, 0.0, 1.0)
    with Image.open(io.BytesIO(_get(server + newest["url"]))) as png:
        shape = shape_mask(png.convert("RGB"))
    assert _centroid_x(shape) < 32, "the map's left wins over the prompt's right"
    assert mask_iou(shape, painted) >= 0.4, f"IoU with the painted map {mask_iou(shape, painted):.2f}"
    _wait(driver, lambda d: d.find_elements("css selector", f'#gallery img[src$="{newest["url"]}"]'),
          "the image in the gallery", timeout=30)
    driver.execute_script("window.scrollTo(0, 0);")
    _save_screenshot(driver)  # the panel open, the painted map and what it made
    driver.find_element("css selector", f'#gallery img[src$="{newest["url"]}"]').click()
    assert "bundled:controlnet, weight 1" in driver.find_element("id", "details-recipe").text
    driver.find_element("id", "details-close").click()

    # "use" off: the same request without the unit, and the recipe says so
    use.click()
    driver.find_element("id", "generate").click()
    _wait(driver, lambda d: len(_finished_cards(d)) == 2, "the image made without the control map")
    assert _finished_cards(driver)[0].find_element("css selector", ".job-title").text.startswith("txt2img:")
    plain = json.loads(_get(f"{server}/latentloom/gallery"))[0]
    assert plain["name"] != newest["name"] and "controlnets" not in plain["recipe"]
    with Image.open(io.BytesIO(_get(server + plain["url"]))) as png:
        assert _centroid_x(shape_mask(png.convert("RGB"))) > 32, "without the map the prompt's right wins"

    # the server's refusal of a unit shows on the page, naming the field
    use.click()
    _set(driver, "control-start", 0.8)
    _set(driver, "control-end", 0.5)
    driver.find_element("id", "generate").click()
    _wait(driver, lambda d: d.find_element("id", "errors").text, "the server's error on the page", timeout=60)
    assert "guidance_start" in driver.find_element("id", "errors").text
    _set(driver, "control-start", 0)
    _set(driver, "control-end", 1)

    # a loaded image is scaled to the output's size (the user's choice, said in the hint)
    left = render_control_map(SceneSpec(shapes=(ShapeSpec("square", "white", "large", "left"),)), size=32)
    left.save(tmp_path / "map32.png")
    driver.find_element("id", "control-file").send_keys(str(tmp_path / "map32.png"))
    exported = lambda: _map_of(driver.execute_script("return controlMap.exportMap();"))  # noqa: E731
    _wait(driver, lambda d: mask_iou(map_mask(exported()), painted) < 0.9, "the loaded map on the canvas", timeout=30)
    assert exported().size == (64, 64)
    expected = map_mask(render_control_map(SceneSpec(shapes=(ShapeSpec("square", "white", "large", "left"),))))
    assert mask_iou(map_mask(exported()), expected) >= 0.8
    assert "scaled" in driver.find_element("id", "control-hint").text

    # img2img sends the unit as well, with the map at the output's size
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "black.png")
    driver.find_element("css selector", 'label[for="mode-img2img"]').click()
    driver.find_element("id", "init-file").send_keys(str(tmp_path / "black.png"))
    _wait(driver, lambda d: "empty" not in d.find_element("id", "canvas-wrap").get_attribute("class"),
          "the input image on the canvas", timeout=30)
    body = driver.execute_script("return buildRequest();")
    (unit,) = body["alwayson_scripts"]["controlnet"]["args"]
    assert body["init_images"] and unit["model"] == models[0] and unit["module"] == "none"
    assert _map_of(unit["image"]).size == (body["width"], body["height"])

    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert not problems, problems


def test_without_controlnets_there_is_no_control_map_panel(browser, tmp_path):
    """A server that offers no ControlNet (the upscaler as its only model): the page is as it was, no panel."""
    with _serve(tmp_path, "--model", "bundled:upscaler") as base:
        assert json.loads(_get(f"{base}/controlnet/model_list")) == {"model_list": []}
        driver = browser
        driver.get(base + "/")
        _wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1",
              "the page to load the server's settings", timeout=60)
        assert not driver.find_element("id", "control-panel").is_displayed()
        assert driver.find_element("id", "control-fields").get_property("disabled")
        assert not driver.find_element("id", "control-use").is_enabled()
        _set(driver, "prompt", "anything")
        body = driver.execute_script("return buildRequest();")
        assert "alwayson_scripts" not in body and body["prompt"] == "anything"
        assert driver.find_element("id", "errors").text == ""
