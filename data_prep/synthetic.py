"""Procedural faces: the embedded data set that the demo, the tests and the benchmarks use.

Each face is drawn with PIL at up to 4x the target size and downsampled with LANCZOS, so edges
are antialiased like a photo's. Every face is a pure function of (seed, index). The layout
is deliberately consistent (centred, upright-ish, same framing as CelebA-HQ) and the
variety sits in colours and shapes, so a tiny DDPM learns the set in minutes on a CPU.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def supersample(size: int) -> int:
    """Drawing scale: 4x for small faces, less for large ones where pixels are already fine."""
    return max(1, min(4, 512 // size))


SKIN_TONES = [(255, 226, 200), (241, 200, 166), (224, 172, 135), (190, 134, 98), (141, 92, 62), (95, 62, 44)]
HAIR_COLOURS = [
    (25, 20, 18),
    (55, 38, 28),
    (96, 62, 38),
    (150, 105, 60),
    (214, 178, 112),
    (160, 70, 35),
    (170, 165, 160),
]
IRIS_COLOURS = [(70, 45, 25), (110, 75, 40), (60, 110, 160), (70, 120, 80), (40, 30, 25)]
HAIR_STYLES = ("short", "long", "bob", "bald", "curly", "bangs")
HAIR_STYLE_WEIGHTS = (0.24, 0.22, 0.16, 0.08, 0.12, 0.18)


def _lerp(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _jitter(rng, colour, amount):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _background(rng, size: int, side: int) -> Image.Image:
    """A soft two-colour gradient at a random angle, like a studio backdrop."""
    grey = rng.uniform(60, 210)
    top = grey + (rng.uniform(0, 255, size=3) - grey) * 0.55  # muted: pulled towards a grey
    bottom = np.clip(top + rng.uniform(-70, 70) + rng.uniform(-25, 25, size=3), 0, 255)
    angle = rng.uniform(-0.6, 0.6)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = np.clip((yy - 0.5) * np.cos(angle) + (xx - 0.5) * np.sin(angle) + 0.5, 0, 1)[..., None]
    pixels = top * (1 - t) + bottom * t
    # a smooth gradient loses nothing by being computed at the output size and upsampled
    return Image.fromarray(pixels.astype(np.uint8), "RGB").resize((side, side), Image.Resampling.BILINEAR)


class _Pen:
    """ImageDraw in unit coordinates: (0, 0) top-left, (1, 1) bottom-right of the canvas."""

    def __init__(self, img: Image.Image):
        self.draw = ImageDraw.Draw(img)
        self.s = img.size[0]

    def box(self, cx, cy, rx, ry):
        s = self.s
        return [(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s]

    def ellipse(self, cx, cy, rx, ry, fill, outline=None, width=0):
        self.draw.ellipse(self.box(cx, cy, rx, ry), fill=fill, outline=outline, width=int(width * self.s))

    def chord(self, cx, cy, rx, ry, start, end, fill):
        # As a polygon: ImageDraw.chord smears a bar across large canvases with float boxes.
        t = np.radians(np.linspace(start, end, 48))
        self.polygon(list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t))), fill)

    def arc(self, cx, cy, rx, ry, start, end, fill, width):
        self.draw.arc(self.box(cx, cy, rx, ry), start, end, fill=fill, width=max(1, int(width * self.s)))

    def polygon(self, points, fill):
        self.draw.polygon([(x * self.s, y * self.s) for x, y in points], fill=fill)

    def line(self, points, fill, width):
        self.draw.line(
            [(x * self.s, y * self.s) for x, y in points], fill=fill, width=max(1, int(width * self.s)), joint="curve"
        )


def _hair_back(pen, rng, style, hair, cx, cy, rx, ry):
    """Hair that sits behind the head and shoulders (long hair, bob)."""
    if style == "long":
        pen.ellipse(cx, cy + 0.12, rx * 1.22, ry * 1.15, hair)
        pen.polygon(
            [(cx - rx * 1.2, cy + 0.1), (cx + rx * 1.2, cy + 0.1), (cx + rx * 1.1, 0.98), (cx - rx * 1.1, 0.98)], hair
        )
    elif style == "bob":
        pen.ellipse(cx, cy + 0.04, rx * 1.2, ry * 1.08, hair)


def _hair_front(pen, rng, style, hair, cx, cy, rx, ry):
    """Hair over the top of the head: the head ellipse cut at a hairline above the brows."""
    if style == "bald":
        return
    if style == "curly":
        for k in range(13):
            a = np.pi * (1.0 + k / 12)
            r = rng.uniform(0.06, 0.08)
            pen.ellipse(cx + rx * 1.0 * np.cos(a), cy - ry * 0.1 + ry * 0.95 * np.sin(a), r, r, hair)
    hairline = {"short": 0.5, "long": 0.45, "bob": 0.4, "bangs": 0.3, "curly": 0.5}[style]
    hairline += rng.uniform(-0.06, 0.06)
    a = np.degrees(np.arcsin(hairline))
    # chord from 180+a to 360-a passes over the crown; its straight edge is the hairline
    pen.chord(cx, cy - ry * 0.03, rx * 1.05, ry * 1.03, 180 + a, 360 - a, hair)
    pen.ellipse(cx, cy - ry * 0.62, rx * 0.92, ry * 0.42, hair)  # fill the crown above the chord
    if style in ("short", "bob", "long"):  # a side-swept fringe so hairlines differ
        part = rng.choice([-1.0, 1.0])
        y0 = cy - ry * hairline
        pen.ellipse(cx + part * rx * 0.4, y0 - ry * 0.02, rx * 0.62, ry * rng.uniform(0.1, 0.16), hair)


def _eye(pen, cx, cy, w, iris, lid, look):
    pen.ellipse(cx, cy, w, w * 0.55, (250, 248, 245))
    pen.ellipse(cx + look, cy, w * 0.52, w * 0.52, iris)
    pen.ellipse(cx + look, cy, w * 0.24, w * 0.24, (15, 12, 10))
    pen.ellipse(cx + look + w * 0.18, cy - w * 0.18, w * 0.1, w * 0.1, (255, 255, 255))
    pen.arc(cx, cy, w, w * 0.6, 190, 350, lid, 0.012)


def _features(pen, rng, cx, cy, rx, ry, skin, hair):
    """Brows, eyes, nose, mouth; `yaw` shifts them sideways like a slightly turned head."""
    yaw = rng.uniform(-0.035, 0.035)
    fx = cx + yaw
    eye_y = cy - ry * rng.uniform(0.02, 0.1)
    eye_dx = rx * rng.uniform(0.38, 0.46)
    eye_w = rx * rng.uniform(0.2, 0.26)
    iris = _jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 15)
    shade = _lerp(skin, (40, 20, 15), 0.35)
    look = rng.uniform(-0.25, 0.25) * eye_w
    for side in (-1, 1):
        _eye(pen, fx + side * eye_dx, eye_y, eye_w, iris, shade, look)
        brow_y = eye_y - eye_w * rng.uniform(1.0, 1.3)
        brow = _lerp(hair, (20, 15, 12), 0.3)
        pen.arc(
            fx + side * eye_dx,
            brow_y + eye_w * 0.5,
            eye_w * 1.25,
            eye_w * 0.6,
            200,
            340,
            brow,
            0.012 + rng.uniform(0, 0.012),
        )
    nose_y = cy + ry * rng.uniform(0.22, 0.3)
    nose_w = rx * rng.uniform(0.12, 0.18)
    pen.line([(fx + yaw * 0.5, eye_y + eye_w * 0.6), (fx - nose_w * 0.3 + yaw, nose_y)], shade, 0.008)
    pen.arc(fx + yaw, nose_y - nose_w * 0.3, nose_w, nose_w * 0.5, 20, 160, shade, 0.012)
    mouth_y = cy + ry * rng.uniform(0.5, 0.58)
    mouth_w = rx * rng.uniform(0.3, 0.45)
    lips = _lips_base(skin)
    smile = rng.uniform(0, 1)
    if smile > 0.55:  # open smile showing teeth
        pen.chord(fx + yaw * 0.5, mouth_y - mouth_w * 0.25, mouth_w, mouth_w * 0.55, 0, 180, lips)
        pen.chord(fx + yaw * 0.5, mouth_y - mouth_w * 0.25, mouth_w * 0.8, mouth_w * 0.35, 0, 180, (245, 240, 232))
    else:
        curve = 0.15 + 0.4 * smile
        pen.arc(fx + yaw * 0.5, mouth_y - mouth_w * curve, mouth_w, mouth_w * curve * 1.6, 15, 165, lips, 0.022)


def _lips_base(skin):
    return _lerp(skin, (150, 40, 50), 0.45)


def draw_face(seed: int, index: int, size: int, grayscale: bool = False) -> Image.Image:
    """One procedural face, RGB, size x size; identical for identical (seed, index, size).

    grayscale: the same face with R = G = B (PIL's luma), a set on which any colour a model
    produces is its own error.
    """
    rng = np.random.default_rng([seed, index])
    side = size * supersample(size)
    img = _background(rng, size, side)
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    pen = _Pen(layer)

    skin = _jitter(rng, _lerp(*_pick_pair(rng, SKIN_TONES)), 8)
    hair = _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 12)
    style = HAIR_STYLES[rng.choice(len(HAIR_STYLES), p=HAIR_STYLE_WEIGHTS)]
    shirt = tuple(int(c) for c in rng.integers(20, 235, size=3))
    cx, cy = 0.5 + rng.uniform(-0.02, 0.02), 0.47 + rng.uniform(-0.02, 0.02)
    rx, ry = rng.uniform(0.23, 0.27), rng.uniform(0.3, 0.34)

    # shoulders go straight onto the background: only the head tilts, and no rotated edge shows
    _Pen(img).ellipse(0.5, 1.08, rng.uniform(0.38, 0.46), 0.26, shirt)
    _hair_back(pen, rng, style, hair, cx, cy, rx, ry)
    neck = _lerp(skin, (0, 0, 0), 0.12)
    pen.polygon(
        [
            (cx - rx * 0.45, cy + ry * 0.6),
            (cx + rx * 0.45, cy + ry * 0.6),
            (cx + rx * 0.5, 0.88),
            (cx - rx * 0.5, 0.88),
        ],
        neck,
    )
    for side_ in (-1, 1):  # ears
        pen.ellipse(cx + side_ * rx * 0.98, cy + ry * 0.02, rx * 0.16, ry * 0.17, neck)
    pen.ellipse(cx, cy, rx, ry, skin)
    _hair_front(pen, rng, style, hair, cx, cy, rx, ry)
    _features(pen, rng, cx, cy, rx, ry, skin, hair)

    tilt = rng.uniform(-7, 7)
    layer = layer.rotate(tilt, resample=Image.Resampling.BILINEAR, center=(cx * side, cy * side))
    img.paste(layer, (0, 0), layer)
    img = img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
    return img.convert("L").convert("RGB") if grayscale else img


def _pick_pair(rng, tones):
    """Two neighbouring skin tones and a mix factor: a continuous range of skin colours."""
    k = int(rng.integers(len(tones) - 1))
    return tones[k], tones[k + 1], float(rng.uniform(0, 1))


def face_grid(seed: int, size: int, rows: int = 8, cols: int = 8, scale: int = 1) -> Image.Image:
    """A rows x cols contact sheet of faces 0.., each shown at size * scale pixels."""
    cell = size * scale
    grid = Image.new("RGB", (cols * cell, rows * cell))
    for i in range(rows * cols):
        face = draw_face(seed, i, size)
        if scale != 1:
            face = face.resize((cell, cell), Image.Resampling.NEAREST)
        grid.paste(face, ((i % cols) * cell, (i // cols) * cell))
    return grid
