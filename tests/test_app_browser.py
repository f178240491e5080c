"""The demo page: its input checks (fast), and the whole app driven in a real headless Chromium.

The browser test starts `python -m export.app` on 127.0.0.1 with a tiny model exported by
`python -m export.onnx`, and drives it with Playwright and Debian's chromium (installed here
with apt-get when missing; Playwright's own browser download is never used). Every request
the page makes to anywhere but that address is blocked and makes the test fail.
Screenshots go to the test's tmp dir, and are copied to $SCREENSHOTS_DIR when that is set.
"""

import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_editing import SIZE  # tests/ is on sys.path (pytest's rootdir-less import)
from tiny_model import make_checkpoint

from export.app import SAMPLER_LABELS, Demo, shown_to_user
from export.backends import load_denoiser
from export.uploads import MAX_SIDE, UserInputError, image_to_model, keep_mask_from_layers, open_upload
from pipeline.core.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS
from pipeline.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 120_000  # for anything that samples; the machine may be shared


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    u, v = x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1)
    return Image.fromarray(np.stack([u, v, 255 - u], -1).astype(np.uint8)).convert(mode)


# --- the page's input checks, without a browser -----------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "1"])
def test_any_image_mode_becomes_a_model_input(mode):
    x = image_to_model(gradient(40, 24, mode), SIZE, 3)
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_transparency_is_flattened_on_white_and_the_center_is_kept():
    image = Image.new("RGBA", (48, 16), (0, 0, 0, 0))  # wide and transparent ...
    image.paste((255, 0, 0, 255), (16, 0, 32, 16))  # ... with an opaque red center square
    x = image_to_model(image, SIZE, 3)
    np.testing.assert_allclose(x[0, :, 2:-2, 2:-2].reshape(3, -1).mean(1), [1, -1, -1], atol=1e-6)
    white_sides = image_to_model(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), SIZE, 3)
    np.testing.assert_allclose(white_sides, 1.0)


def test_uploads_that_cannot_be_used_are_one_line_messages(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    gradient(MAX_SIDE + 1, 8).save(tmp_path / "wide.png")
    with open(tmp_path / "big.png", "wb") as f:
        f.truncate(21 * 2**20)  # sparse: the size check must come before any reading
    for name, message in [
        ("notes.png", "not an image"),
        ("wide.png", f"limit is {MAX_SIDE} px"),
        ("big.png", "limit is 20 MB"),
    ]:
        with pytest.raises(UserInputError, match=message):
            open_upload(str(tmp_path / name))
    with pytest.raises(UserInputError, match="Upload an image"):
        open_upload(None)


def test_the_painted_strokes_are_the_region_to_regenerate():
    canvas = (64, 32)
    empty = Image.new("RGBA", canvas, (0, 0, 0, 0))
    with pytest.raises(UserInputError, match="mask is empty"):
        keep_mask_from_layers([empty], canvas, SIZE)
    with pytest.raises(UserInputError, match="mask is empty"):
        keep_mask_from_layers([], canvas, SIZE)
    stroke = empty.copy()
    stroke.paste((0, 0, 0, 255), (32, 0, 48, 32))  # the right half of the centered 32x32 square
    keep = keep_mask_from_layers([stroke], canvas, SIZE)
    assert keep.shape == (1, 1, SIZE, SIZE)
    np.testing.assert_array_equal(keep[0, 0, :, : SIZE // 2], 1)
    np.testing.assert_array_equal(keep[0, 0, :, SIZE // 2 :], 0)
    outside = empty.copy()
    outside.paste((0, 0, 0, 255), (0, 0, 8, 32))  # painted only where the center crop cuts
    with pytest.raises(UserInputError, match="vanishes"):
        keep_mask_from_layers([outside], canvas, SIZE)


def test_a_model_that_cannot_be_loaded_is_a_one_line_exit(tmp_path):
    from export.app import main

    (tmp_path / "denoiser.onnx").write_bytes(b"not a graph")
    for model, message in [
        (tmp_path / "missing.onnx", "no such file"),
        (tmp_path / "denoiser.onnx", "sidecar"),
        (tmp_path, "no complete checkpoint"),
    ]:
        with pytest.raises(SystemExit, match=message) as exit_info:
            main(["--model", str(model)])
        assert str(exit_info.value).startswith("export.app: ") and "\n" not in str(exit_info.value)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    torch.set_num_threads(2)
    return make_checkpoint(tmp_path_factory.mktemp("run"))


def test_handlers_answer_bad_requests_with_a_status_line(tiny_checkpoint, tmp_path):
    demo = Demo(load_denoiser(tiny_checkpoint, threads=2), max_images=4)  # --model CKPT_DIR: torch
    on_generate, on_edit = shown_to_user(demo.generate), shown_to_user(demo.edit)
    gradient(30, 20).save(tmp_path / "face.png")
    with pytest.warns(UserWarning):  # gr.Warning outside a request: a Python warning
        for result, message in [
            (on_generate(0, "DDIM", 5, 0.0, 5), "Number of images must be from 1 to 4"),
            (on_generate(-1, "DDIM", 5, 0.0, 1), "seed must be from 0"),
            (on_generate(0, "Euler", 5, 0.0, 1), "Unknown sampler"),
            (on_generate(0, "DDIM", 0, 0.0, 1), "Steps must be from 1 to 1000"),
            (on_edit(str(tmp_path / "face.png"), 2.0, "DDIM", 5, 0), "Strength must be from 0 to 1"),
            (on_edit(None, 0.5, "DDIM", 5, 0), "Upload an image first"),
        ]:
            assert message in result[-1] and result[-1].startswith("⚠")
    gallery, strip, status = on_generate(3, "DDPM", 4, 0.0, 2)
    assert [im.size for im, _ in gallery] == [(SIZE, SIZE)] * 2 and "images/s" in status
    assert strip.size == (4 * 64, 2 * 64)  # 4 recorded steps; tiles enlarged from 16 to 64 px
    before, after, status = on_edit({"path": str(tmp_path / "face.png")}, 0.5, "DDIM", 6, 0)
    assert before.size == after.size == (SIZE, SIZE) and "3 of 6 DDIM steps" in status


# --- the app in a real browser ---------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, installed with apt-get when missing (CI pre-installs it)."""
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip(f"{CHROMIUM} is missing and cannot be installed here: run `apt-get install -y chromium`")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                pytest.skip(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return CHROMIUM


@pytest.fixture(scope="module")
def app_url(tiny_checkpoint, tmp_path_factory):
    """`python -m export.app` on a tiny exported ONNX model, on 127.0.0.1; killed afterwards."""
    work = tmp_path_factory.mktemp("app")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(work / "gradio")}
    onnx = work / "denoiser.onnx"
    subprocess.run(
        [sys.executable, "-m", "export.onnx", "--ckpt", str(tiny_checkpoint), "--out", str(onnx)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
    )
    port, log = free_port(), open(work / "app.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "export.app",
            "--model",
            str(onnx),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"the app exited with {server.returncode}:\n{(work / 'app.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer on {url} within 180 s:\n{(work / 'app.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        log.close()


def image_size_at(page, selector: str, base: str) -> list[tuple[int, int]]:
    """Download every <img> under selector from the app (it must be served by the app) -> sizes."""
    sizes = []
    for img in page.query_selector_all(f"{selector} img"):
        src = img.get_attribute("src")
        assert src.startswith(base + "/"), src
        sizes.append(Image.open(io.BytesIO(page.request.get(src).body())).size)
    return sizes


def image_at(page, selector: str) -> np.ndarray:
    src = page.query_selector(f"{selector} img").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def wait_for_images(page, selector: str, count: int = 1) -> None:
    """Until `count` images under selector have loaded (the status line can arrive first)."""
    page.wait_for_function(
        f"Array.from(document.querySelectorAll({selector + ' img'!r}))"
        f".filter(i => i.complete && i.naturalWidth > 0).length >= {count}",
        timeout=WAIT_MS,
    )


def wait_for_status(page, elem_id: str, text: str) -> str:
    page.wait_for_function(f"document.querySelector('#{elem_id} textarea').value.includes({text!r})", timeout=WAIT_MS)
    return page.input_value(f"#{elem_id} textarea")


def generate_in_page(page, url, shots):
    """Generate: 8 images (the default) and the x0 trajectory."""
    page.click("#generate-button")
    status = wait_for_status(page, "generate-status", "images/s")
    wait_for_images(page, "#gallery", 8)
    wait_for_images(page, "#trajectory")
    page.screenshot(path=shots / "generate.png", full_page=True)
    assert status.startswith("8 images in")
    first = f"{SAMPLER_LABELS[DEFAULT_SAMPLER]} {DEFAULT_STEPS[DEFAULT_SAMPLER]} steps"
    assert first in status  # the page opens on the benchmark's choice, and says why
    assert "benchmarks quality" in page.inner_text("body")
    assert image_size_at(page, "#gallery", url) == [(SIZE, SIZE)] * 8
    [strip] = image_size_at(page, "#trajectory", url)
    assert strip[1] == 4 * 64 and strip[0] % 64 == 0


def edit_in_page(page, url, shots, tmp_path, server):
    """Edit: a wide PNG is center-cropped to the model's size and edited; a file that is not an image is
    a message in the page, and the server lives on."""
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-input input[type=file]", tmp_path / "portrait.png")
    page.wait_for_selector("#edit-input img")
    page.click("#edit-button")
    status = wait_for_status(page, "edit-status", "images/s")
    wait_for_images(page, "#edit-before")
    wait_for_images(page, "#edit-result")
    page.screenshot(path=shots / "edit.png", full_page=True)
    n = DEFAULT_STEPS[DEFAULT_SAMPLER]
    assert f"{n // 2} of {n} {SAMPLER_LABELS[DEFAULT_SAMPLER]} steps" in status  # strength 0.5
    assert image_size_at(page, "#edit-before", url) == [(SIZE, SIZE)]
    assert image_size_at(page, "#edit-result", url) == [(SIZE, SIZE)]

    # A file that is not an image: a message in the page, and the server lives on.
    page.click("#edit-input button[aria-label='Remove Image']")
    page.set_input_files("#edit-input input[type=file]", tmp_path / "notes.png")
    page.click("#edit-button")
    wait_for_status(page, "edit-status", "not an image")
    page.screenshot(path=shots / "edit_bad_input.png", full_page=True)
    assert server.poll() is None


def inpaint_in_page(page, url, shots, tmp_path):
    """Inpaint: an empty mask is refused; a painted stroke is regenerated, the rest kept exactly."""
    page.get_by_role("tab", name="Inpaint").click()
    page.get_by_text("step-by-step sampler").wait_for()  # why there is no solver here
    page.wait_for_selector("#inpaint-input canvas", state="visible")  # an upload before this is lost
    page.set_input_files("#inpaint-input input[type=file]", tmp_path / "square.png")
    page.locator("#inpaint-input").get_by_text("select the draw tool").wait_for(state="hidden")
    page.click("#inpaint-button")
    wait_for_status(page, "inpaint-status", "mask is empty")
    page.click("#inpaint-input button[aria-label='Brush']")
    canvas = max(
        (c.bounding_box() for c in page.query_selector_all("#inpaint-input canvas")),
        key=lambda box: box["width"] * box["height"],
    )
    x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(x - 30, y)
    page.mouse.down()
    page.mouse.move(x + 30, y, steps=10)
    page.mouse.up()
    page.click("#inpaint-button")
    wait_for_status(page, "inpaint-status", "images/s")
    wait_for_images(page, "#inpaint-before")
    wait_for_images(page, "#inpaint-result")
    page.screenshot(path=shots / "inpaint.png", full_page=True)
    kept, result = image_at(page, "#inpaint-before"), image_at(page, "#inpaint-result")
    assert kept.shape == result.shape == (SIZE, SIZE, 3)
    hole = np.all(kept == 128, axis=-1)  # the app greys out what it regenerated
    assert 0 < hole.sum() < SIZE * SIZE
    np.testing.assert_array_equal(result[~hole], kept[~hole])


@pytest.mark.integration
def test_generate_edit_and_inpaint_in_a_real_browser(app_url, chromium, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    url, server = app_url
    shots = tmp_path / "screens"
    shots.mkdir()
    gradient(96, 64).save(tmp_path / "portrait.png")
    gradient(256, 256).save(tmp_path / "square.png")
    (tmp_path / "notes.png").write_text("not an image")
    elsewhere = []

    def only_this_app(route):
        if route.request.url.startswith(url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.route("**/*", only_this_app)
        try:
            page.goto(url + "/")
            page.wait_for_selector("#generate-button")

            generate_in_page(page, url, shots)
            edit_in_page(page, url, shots, tmp_path, server)
            inpaint_in_page(page, url, shots, tmp_path)
        except Exception:
            page.screenshot(path=shots / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
            if os.environ.get("SCREENSHOTS_DIR"):
                shutil.copytree(shots, os.environ["SCREENSHOTS_DIR"], dirs_exist_ok=True)
    assert elsewhere == [], f"the page tried to reach beyond {url}: {elsewhere[:5]}"
    assert server.poll() is None
