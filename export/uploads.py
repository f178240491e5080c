"""What the page takes in and gives back, without gradio: uploads checked and converted to the
model's input (channels, center crop, size), inpainting masks from painted layers, result images,
x0-trajectory strips, and the checks of the form's numbers. Every refusal is a UserInputError whose
message is shown on the page as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.sampling import to_uint8

MAX_UPLOAD_BYTES = 20 * 2**20
MAX_SIDE = 4096  # px; bigger uploads are refused before they are decoded
MAX_SEED = 2**32 - 1


class UserInputError(ValueError):
    """Something in the request the page cannot use; the message is shown to the user."""


def open_upload(source) -> Image.Image:
    """A PIL image from an upload (path or PIL image), checked for size before decoding."""
    if source is None:
        raise UserInputError("Upload an image first.")
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source["path"] if isinstance(source, dict) else source)  # dict: gradio's FileData
        if path.stat().st_size > MAX_UPLOAD_BYTES:
            raise UserInputError(
                f"The file is {path.stat().st_size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB."
            )
        try:
            image = Image.open(path)  # reads the header only
        except (UnidentifiedImageError, OSError):
            raise UserInputError("That file is not an image this page can read (use PNG, JPEG or WebP).") from None
    if max(image.size) > MAX_SIDE:
        raise UserInputError(f"The image is {image.size[0]}x{image.size[1]} px; the limit is {MAX_SIDE} px a side.")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise UserInputError(f"The image could not be decoded ({e}).") from None
    return ImageOps.exif_transpose(image)


def to_model_mode(image: Image.Image, channels: int) -> Image.Image:
    """RGB (or L for 1-channel models); transparency is flattened onto white, CMYK/16-bit converted."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray((np.asarray(image, np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def center_square(image: Image.Image, size: int, resample=Image.Resampling.LANCZOS) -> Image.Image:
    """The largest centered square, resized to size x size."""
    return ImageOps.fit(image, (size, size), method=resample, centering=(0.5, 0.5))


def image_to_model(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """(1, C, size, size) float32 in [-1, 1]."""
    pixels = np.asarray(center_square(to_model_mode(image, channels), size), np.float32)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return (pixels.transpose(2, 0, 1)[None] / 127.5 - 1.0).astype(np.float32)


def model_to_pil(x: np.ndarray) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> B PIL images."""
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(x)]


def keep_mask_from_layers(layers, canvas_size: tuple[int, int], size: int) -> np.ndarray:
    """(1, 1, size, size) float32, 1 = keep: the painted strokes (alpha > 0) are what to regenerate."""
    painted = np.zeros(canvas_size[::-1], bool)
    for layer in layers or []:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if alpha.shape != painted.shape:
            layer_img = Image.fromarray(alpha.astype(np.uint8) * 255).resize(canvas_size, Image.Resampling.NEAREST)
            alpha = np.asarray(layer_img) > 0
        painted |= alpha
    if not painted.any():
        raise UserInputError("Paint over the region to regenerate first: the mask is empty.")
    # Same crop as the image; a model pixel is regenerated when any part of it was painted.
    small = center_square(Image.fromarray(painted.astype(np.uint8) * 255), size, Image.Resampling.BOX)
    keep = (np.asarray(small) == 0).astype(np.float32)
    if keep.all():
        raise UserInputError(f"The painted region vanishes at the model's {size} px (paint a larger area).")
    return keep[None, None]


def trajectory_strip(frames, rows: int, min_tile: int = 64) -> Image.Image:
    """x0 predictions as a grid: one row per image (up to `rows`), one column per recorded step.
    Small models' tiles are enlarged by an integer factor (nearest) so the strip is legible."""
    tiles = [model_to_pil(x0[:rows]) for _, x0 in frames]
    factor = max(1, -(-min_tile // tiles[0][0].size[0]))
    tiles = [
        [t.resize((t.size[0] * factor, t.size[1] * factor), Image.Resampling.NEAREST) for t in column]
        for column in tiles
    ]
    w, h = tiles[0][0].size
    strip = Image.new(tiles[0][0].mode, (w * len(tiles), h * len(tiles[0])))
    for col, column in enumerate(tiles):
        for row, tile in enumerate(column):
            strip.paste(tile, (col * w, row * h))
    return strip


def check_range(name: str, value, lo: float, hi: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not lo <= number <= hi:  # also False for NaN
        raise UserInputError(f"{name} must be from {lo:g} to {hi:g}; got {value}.")
    return number


def check_seed(seed) -> int:
    number = check_range("The seed", seed, 0, MAX_SEED)
    if not number.is_integer():
        raise UserInputError(f"The seed must be a whole number; got {seed}.")
    return int(number)


def timing(n: int, seconds: float, what: str) -> str:
    per_second = n / max(seconds, 1e-9)
    return f"{n} image{'s' if n != 1 else ''} in {seconds:.2f} s ({per_second:.2f} images/s) · {what}"
