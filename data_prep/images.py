"""Turn the bytes of one input image into the bytes of one square training image.

`prepare_image` never raises on bad input: it returns (None, reason) so a corrupt file
becomes a line in the manifest's `skipped` list instead of a crashed run.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


def decode(data: bytes, size: int) -> tuple[Image.Image | None, tuple[int, int] | None, str | None]:
    """Decode and upright one image: (image, original (w, h), None) or (None, None, reason)."""
    if len(data) == 0:
        return None, None, "zero bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, None, "not an image"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, None, f"unreadable: {e}"
    except Exception as e:  # PIL raises a zoo of errors on hostile headers
        return None, None, f"unreadable: {type(e).__name__}: {e}"
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        w, h = img.size
        if orientation in _TRANSPOSING_ORIENTATIONS:
            w, h = h, w
        if min(w, h) < size:
            return None, None, f"too small ({w}x{h} < {size})"
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; keep 2x margin so LANCZOS still antialiases.
        img.draft("RGB", (2 * size, 2 * size))
        img.load()
        img = ImageOps.exif_transpose(img)
    except OSError as e:
        reason = "truncated" if "truncated" in str(e).lower() else f"unreadable: {e}"
        return None, None, reason
    except Exception as e:
        return None, None, f"unreadable: {type(e).__name__}: {e}"
    return img, (w, h), None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: PIL's own convert clips at 255 instead of scaling.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif img.mode == "F":
        arr = np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Largest centred square, resized to size x size with an antialiasing filter."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode RGB to png|jpg|webp bytes; deterministic for a given Pillow build."""
    buf = io.BytesIO()
    if fmt == "png":
        # zlib level 6 costs ~3x the encode time of level 3 for ~10% smaller photo-like PNGs
        img.save(buf, "PNG", compress_level=3)
    elif fmt == "jpg":
        img.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, lossless=quality >= 100, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


def prepare_image(data: bytes, size: int, fmt: str, quality: int):
    """Bytes in, (encoded bytes, original (w, h), None) or (None, None, reason) out."""
    img, orig_size, reason = decode(data, size)
    if img is None:
        return None, None, reason
    try:
        out = center_crop_resize(to_rgb(img), size)
    except Exception as e:  # a decoder can defer its failure to the first pixel access
        return None, None, f"unreadable: {type(e).__name__}: {e}"
    return encode(out, fmt, quality), orig_size, None
