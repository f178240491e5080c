"""The interactive demo: generate, edit (SDEdit) and inpaint faces with the exported denoiser.

    python -m export.app --model denoiser.onnx|denoiser.plan|CKPT_DIR [--host 127.0.0.1] [--port 7860]

A Gradio page with three tabs on one model loaded at start. Requests are queued one at a time
(the engine is not shared between two batches) and every batch fits the engine's profile.
Uploads are checked, converted to the model's channels, center-cropped and resized to its
size; anything the page cannot use is reported in the page, never as a traceback. Gradio's
analytics and version check are off, no share link is made: nothing leaves the host.
"""

from __future__ import annotations

import argparse
import functools
import html
import os
import sys
import time
import traceback

import numpy as np

from export.backends import load_denoiser
from export.uploads import (
    MAX_SEED,
    MAX_UPLOAD_BYTES,
    UserInputError,
    check_range,
    check_seed,
    image_to_model,
    keep_mask_from_layers,
    model_to_pil,
    open_upload,
    timing,
    trajectory_strip,
)
from pipeline.core.denoiser import BackendUnavailable, ModelError
from pipeline.core.editing import X0Trajectory, inpaint, sdedit
from pipeline.core.sampling import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    default_steps,
    generate,
    sampler_timesteps,
)
from pipeline.core.sidecar import SidecarError

# Set before gradio is imported: it reads them at import and Blocks() time (telemetry, version check).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
import gradio as gr  # noqa: E402

DEFAULT_MAX_BATCH = 16  # engines without a batch maximum (ONNX) still get bounded batches
TRAJECTORY_FRAMES = 8
TRAJECTORY_ROWS = 4
IMAGE_HEIGHT = 256  # px on the page for single results
SAMPLER_LABELS = {"unipc": "UniPC", "dpmpp_2m": "DPM-Solver++(2M)", "ddim": "DDIM", "ddpm": "DDPM"}
SAMPLER_NAMES = {label: name for name, label in SAMPLER_LABELS.items()}
DEFAULT_WHY = (
    "Opens on UniPC with 10 network calls per image: in `python -m benchmarks quality` on the demo "
    "model it scored classifier-FID 81.6, level with DDPM-250 (82.4, 25x the calls) and ahead of "
    "DDIM-50 with eta 1 (113, 5x the calls); 5 calls blur the faces."
)


# --- the handlers --------------------------------------------------------------------------


def shown_to_user(fn):
    """Handler wrapper: a failed request leaves the page as it was, shows a warning toast and puts the
    one-line reason into the status box (the last output). Unexpected errors also log a traceback."""

    @functools.wraps(fn)  # keeps the signature, so gradio still sees the gr.Progress default
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserInputError as e:
            message = str(e)
        except Exception as e:  # the server must survive whatever one request does
            traceback.print_exc()
            message = f"Sampling failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        gr.Warning(html.escape(message))
        return (gr.skip(), gr.skip(), f"⚠ {message}")

    return wrapped


class Demo:
    """The loaded denoiser and what the three tabs do with it. Each handler returns
    (images or gallery, image, status line) and raises UserInputError for input it cannot use."""

    def __init__(self, denoiser, max_images: int = 16):
        self.denoiser, self.info = denoiser, denoiser.info
        self.batch = min(self.info.batch_max or DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH)
        self.max_images = max_images

    def _sampler(self, sampler, steps, seed, choices=SAMPLERS) -> tuple[str, int, int]:
        name = SAMPLER_NAMES.get(str(sampler), str(sampler).lower())
        if name not in choices:
            raise UserInputError(
                f"Unknown sampler {sampler!r}; choose {', '.join(SAMPLER_LABELS[c] for c in choices)}."
            )
        return name, int(check_range("Steps", steps, 1, self.info.diffusion.num_timesteps)), check_seed(seed)

    @staticmethod
    def _progress(progress, total: int, desc: str):
        """A no-argument step counter driving gr.Progress (or nothing, outside the page)."""
        if progress is None:
            return None
        done = [0]

        def step(*_):
            done[0] += 1
            progress((done[0], total), desc=desc)

        progress((0, total), desc=desc)
        return step

    def generate(self, seed, sampler, steps, eta, num, progress=None):
        """-> (gallery [(image, caption)], trajectory strip, status)."""
        sampler, steps, seed = self._sampler(sampler, steps, seed)
        eta = check_range("eta", eta, 0.0, 1.0) if sampler == "ddim" else 0.0  # the slider is DDIM's alone
        num = int(check_range("Number of images", num, 1, self.max_images))
        chunks = -(-num // self.batch)
        on_step = self._progress(progress, chunks * steps, f"{SAMPLER_LABELS[sampler]}, {steps} steps")
        recorder = X0Trajectory(steps, max(1, steps // (TRAJECTORY_FRAMES - 1)), on_step)
        start = time.perf_counter()
        x = generate(
            self.denoiser, num, batch=self.batch, sampler=sampler, steps=steps, eta=eta, seed=seed, callback=recorder
        )
        seconds = time.perf_counter() - start
        gallery = [(im, f"seed {seed} #{i}") for i, im in enumerate(model_to_pil(x))]
        what = f"{SAMPLER_LABELS[sampler]} {steps} steps{f', eta {eta:g}' if sampler == 'ddim' else ''} · {self.denoiser.name}"
        return gallery, trajectory_strip(recorder.frames, TRAJECTORY_ROWS), timing(num, seconds, what)

    def edit(self, upload, strength, sampler, steps, seed, progress=None):
        """SDEdit -> (the input as the model sees it, result, status)."""
        sampler, steps, seed = self._sampler(sampler, steps, seed)
        strength = check_range("Strength", strength, 0.0, 1.0)
        x = image_to_model(open_upload(upload), self.info.image_size, self.info.channels)
        n_run = int(round(strength * len(sampler_timesteps(self.info.schedule(), sampler, steps))))
        on_step = self._progress(progress, max(n_run, 1), f"SDEdit, {n_run} of {steps} steps")
        start = time.perf_counter()
        out = sdedit(self.denoiser, x, strength, sampler=sampler, steps=steps, seed=seed, callback=on_step)
        seconds = time.perf_counter() - start
        status = timing(1, seconds, f"strength {strength:.2f}: {n_run} of {steps} {SAMPLER_LABELS[sampler]} steps")
        return model_to_pil(x)[0], model_to_pil(out)[0], status

    def inpaint(self, editor, sampler, steps, resample, seed, progress=None):
        """RePaint -> (the input with the region to regenerate greyed out, result, status)."""
        sampler, steps, seed = self._sampler(sampler, steps, seed, STOCHASTIC_SAMPLERS)
        resample = int(check_range("Resampling", resample, 1, 10))
        background = (editor or {}).get("background")
        image = open_upload(background)
        keep = keep_mask_from_layers(editor.get("layers"), background.size, self.info.image_size)
        x = image_to_model(image, self.info.image_size, self.info.channels)
        on_step = self._progress(progress, steps, f"Inpainting, {steps} steps x {resample}")
        start = time.perf_counter()
        out = inpaint(
            self.denoiser, x, keep, sampler=sampler, steps=steps, seed=seed, resample=resample, callback=on_step
        )
        seconds = time.perf_counter() - start
        status = timing(
            1, seconds, f"{steps * resample} denoiser calls ({steps} {SAMPLER_LABELS[sampler]} steps x {resample})"
        )
        return model_to_pil(np.where(keep > 0, x, 0.0))[0], model_to_pil(out)[0], status


# Nothing leaves the host and nothing runs beside the page: no share link, browser tab, server-side
# rendering, MCP server, PWA, monitoring page or run history.
LAUNCH_OFF = ("share", "inbrowser", "ssr_mode", "mcp_server", "pwa", "enable_monitoring", "run_history")
LAUNCH_OPTIONS = dict(
    show_error=True, max_file_size=MAX_UPLOAD_BYTES, footer_links=["settings"], **dict.fromkeys(LAUNCH_OFF, False)
)

# --- the page ------------------------------------------------------------------------------

CSS = """
/* Model-size images (16..256 px) shown large and sharp rather than as thumbnails or blurred. */
.pixelated img { image-rendering: pixelated; object-fit: contain; width: 100%; height: 100%; }
"""


def result_image(label: str, elem_id: str) -> gr.Image:
    """An output image at the model's size, shown enlarged (PNG: no compression artefacts)."""
    return gr.Image(
        label=label, format="png", interactive=False, elem_id=elem_id, elem_classes="pixelated", height=IMAGE_HEIGHT
    )


def before_after_status(tab: str, before_label: str) -> tuple[gr.Image, gr.Image, gr.Textbox]:
    """An edit tab's outputs, in a column: what the model was given, the result, the status line."""
    with gr.Column(scale=1):
        before = result_image(before_label, f"{tab}-before")
        after = result_image("Result", f"{tab}-result")
        return before, after, gr.Textbox(label="Time", interactive=False, elem_id=f"{tab}-status")


def build_ui(demo: Demo) -> gr.Blocks:
    info = demo.info
    samplers = [SAMPLER_LABELS[s] for s in SAMPLERS]
    schedule = info.schedule()
    first, first_steps = SAMPLER_LABELS[DEFAULT_SAMPLER], default_steps(schedule, DEFAULT_SAMPLER)
    max_steps = info.diffusion.num_timesteps

    @shown_to_user
    def on_generate(seed, sampler, steps, eta, num, progress=gr.Progress()):
        return demo.generate(seed, sampler, steps, eta, num, progress)

    @shown_to_user
    def on_edit(upload, strength, sampler, steps, seed, progress=gr.Progress()):
        return demo.edit(upload, strength, sampler, steps, seed, progress)

    @shown_to_user
    def on_inpaint(editor, sampler, steps, resample, seed, progress=gr.Progress()):
        return demo.inpaint(editor, sampler, steps, resample, seed, progress)

    # delete_cache: uploads and results older than an hour are removed hourly (a long-running demo).
    with gr.Blocks(title="DDPM faces", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            f"## DDPM faces\n{info.image_size} px · {info.diffusion.prediction_type} model · "
            f"{info.diffusion.num_timesteps} training steps · running on {demo.denoiser.name}\n\n{DEFAULT_WHY}"
        )
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                    sampler = gr.Radio(samplers, value=first, label="Sampler", elem_id="generate-sampler")
                    steps = gr.Slider(1, max_steps, value=first_steps, step=1, label="Steps (network calls per image)")
                    eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="eta (DDIM only; 0 = deterministic)")
                    num = gr.Slider(
                        1,
                        demo.max_images,
                        value=min(8, demo.max_images),
                        step=1,
                        label=f"Number of images (batches of up to {demo.batch})",
                    )
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="Samples",
                        columns=4,
                        format="png",
                        elem_id="gallery",
                        elem_classes="pixelated",
                        object_fit="contain",
                        height="auto",
                    )
                    trajectory = gr.Image(
                        label="Denoising trajectory: x0 prediction, left to right as t falls "
                        f"(first {TRAJECTORY_ROWS} images)",
                        format="png",
                        interactive=False,
                        elem_id="trajectory",
                        elem_classes="pixelated",
                    )
                    status = gr.Textbox(label="Time", interactive=False, elem_id="generate-status")
            run.click(on_generate, [seed, sampler, steps, eta, num], [gallery, trajectory, status])
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    upload = gr.Image(
                        type="filepath", label="Image to edit", sources=["upload", "clipboard"], elem_id="edit-input"
                    )
                    strength = gr.Slider(
                        0.0, 1.0, value=0.5, step=0.05, label="Strength (0 = keep the image, 1 = a new face)"
                    )
                    edit_sampler = gr.Radio(samplers, value=first, label="Sampler")
                    chain_note = "Steps (of the whole chain; strength x steps are run)"
                    edit_steps = gr.Slider(1, max_steps, value=first_steps, step=1, label=chain_note)
                    edit_seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                    edit_run = gr.Button("Edit", variant="primary", elem_id="edit-button")
                edit_outputs = before_after_status("edit", f"Input at {info.image_size} px")
            # preprocess=False: the handler gets the upload's (validated) path, not gradio's decode of it,
            # so a file that is not an image is reported by open_upload like any other bad input.
            edit_inputs = [upload, strength, edit_sampler, edit_steps, edit_seed]
            edit_run.click(on_edit, edit_inputs, edit_outputs, preprocess=False)
        with gr.Tab("Inpaint", id="inpaint"):
            with gr.Row():
                with gr.Column(scale=1):
                    editor = gr.ImageMask(
                        type="pil",
                        label="Upload, then paint the region to regenerate",
                        sources=["upload", "clipboard"],
                        format="png",
                        transforms=(),
                        layers=False,
                        elem_id="inpaint-input",
                    )
                    gr.Markdown(
                        "Inpainting pastes the kept region back after every step, so it runs a "
                        "step-by-step sampler (DDPM, or DDIM), not the multistep solvers, whose "
                        "history would not know about the paste. DDPM's fresh noise blends the seam."
                    )
                    paint_sampler = gr.Radio(
                        [SAMPLER_LABELS[s] for s in STOCHASTIC_SAMPLERS], value=SAMPLER_LABELS["ddpm"], label="Sampler"
                    )
                    paint_steps = gr.Slider(1, max_steps, value=min(50, max_steps), step=1, label="Steps")
                    repaint_note = "Resampling per step (RePaint; more blends the seam better, costs linearly)"
                    resample = gr.Slider(1, 10, value=2, step=1, label=repaint_note)
                    paint_seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                    paint_run = gr.Button("Inpaint", variant="primary", elem_id="inpaint-button")
                paint_outputs = before_after_status("inpaint", "Kept region")
            paint_run.click(on_inpaint, [editor, paint_sampler, paint_steps, resample, paint_seed], paint_outputs)
    # One request at a time: the engine runs one batch at once; a bounded queue refuses the rest.
    return page.queue(default_concurrency_limit=1, max_size=32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.app", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="denoiser.onnx, denoiser.plan or a checkpoint/run directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--provider", default="auto", choices=["auto", "cuda", "cpu"], help="ONNX Runtime provider")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the denoiser")
    parser.add_argument("--max-images", type=int, default=16, help="most images one Generate request may ask for")
    args = parser.parse_args(argv)
    try:
        denoiser = load_denoiser(args.model, provider=args.provider, threads=args.threads)
    except (ModelError, SidecarError, BackendUnavailable) as e:
        raise SystemExit(f"export.app: {e}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"export.app: binding {args.host}: anyone who can reach this host can use the page", file=sys.stderr)
    demo = Demo(denoiser, max_images=args.max_images)
    print(f"export.app: {denoiser.name}, {demo.info.image_size} px, batches of up to {demo.batch}", flush=True)
    try:
        build_ui(demo).launch(server_name=args.host, server_port=args.port, css=CSS, **LAUNCH_OPTIONS)
    except OSError as e:  # port taken, address not on this host
        raise SystemExit(f"export.app: cannot serve on {args.host}:{args.port} ({e})") from None


if __name__ == "__main__":
    main()
