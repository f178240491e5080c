"""The learning benchmark's report: tables, the classifier-FID curve and the sheet of samples per variant."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from benchmarks import common


def report(result: dict, plan: dict, samples_dir: Path, out_dir: Path) -> None:
    """Tables, the curve and the sample sheet from result['results'] and the kept samples."""
    faces, gray = result["results"]["faces"], result["results"]["grayscale"]
    metric = "classifier-FID"
    runs = {k: v for k, v in faces.items() if "points" in v}
    floor = faces["val split (floor)"]["floor"]
    rows = []
    for name, r in runs.items():
        last = r["points"][-1]
        rows.append(
            [
                name,
                r["steps"],
                r["batch"],
                r["wall_seconds"],
                r["images_per_second"],
                min(p[metric] for p in r["points"]),
                last[metric],
                r["eta0"][metric],
                r["eta0"][metric] / last[metric],
                last["precision"],
                last["recall"],
                last["coverage"],
            ]
        )
    rows.append(
        [
            "val split (floor)",
            None,
            None,
            None,
            None,
            None,
            floor[metric],
            None,
            None,
            floor["precision"],
            floor["recall"],
            floor["coverage"],
        ]
    )
    result["tables"].append(
        common.table(
            f"Faces: {plan['steps'] * plan['batch']:,} images per variant, {plan['num']} samples, DDIM-{plan['sampler_steps']}",
            [
                "variant",
                "steps",
                "batch",
                "train s",
                "images/s",
                f"best {metric}",
                f"last {metric} (eta 1)",
                f"{metric} eta 0",
                "eta 0 / eta 1",
                "precision",
                "recall",
                "coverage",
            ],
            rows,
        )
    )
    points = sorted({p["images_seen"] for r in runs.values() for p in r["points"]})
    result["tables"].append(
        common.table(
            f"Faces: {metric} (eta 1) against images seen",
            ["variant", *[f"{n:,}" for n in points]],
            [
                [name, *[next((p[metric] for p in r["points"] if p["images_seen"] == n), None) for n in points]]
                for name, r in runs.items()
            ],
        )
    )
    gruns = {k: v for k, v in gray.items() if "points" in v}
    if gruns:
        gfloor = gray["val split (floor)"]["floor"]
        result["tables"].append(
            common.table(
                "Grayscale faces: colour cast (0-255) and scores of the last checkpoint",
                [
                    "variant",
                    "colour cast eta 1",
                    "colour cast eta 0",
                    f"{metric} eta 1",
                    f"{metric} eta 0",
                    "precision",
                ],
                [
                    [
                        n,
                        r["points"][-1]["colour_cast"],
                        r["eta0"]["colour_cast"],
                        r["points"][-1][metric],
                        r["eta0"][metric],
                        r["points"][-1]["precision"],
                    ]
                    for n, r in gruns.items()
                ]
                + [["val split (data)", gfloor["colour_cast"], None, gfloor[metric], None, gfloor["precision"]]],
            )
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    series = {
        name: ([p["images_seen"] for p in r["points"]], [p[metric] for p in r["points"]]) for name, r in runs.items()
    }
    common.plot_curves(
        out_dir / "learning_cfid.png",
        f"Tiny model: {metric} (DDIM-{plan['sampler_steps']} eta 1, N={plan['num']}) against images seen",
        "images seen",
        metric,
        series,
        logy=True,
    )
    result["plots"].append("learning_cfid.png")
    grid = sample_sheet(samples_dir, list(runs) + list(gruns), len(runs))
    buf = io.BytesIO()
    grid.save(buf, format="png")
    common.atomic_write_bytes(out_dir / "learning_samples.png", buf.getvalue())
    result["plots"].append("learning_samples.png")
    result["notes"].append(
        "learning_samples.png: the first 12 samples of each variant's last checkpoint, DDIM eta 1 "
        "then eta 0 on each row; the face runs first, then the grayscale runs."
    )


def sample_sheet(samples_dir: Path, names: list[str], num_faces: int, per_row: int = 12):
    """One row per variant: 12 eta-1 samples, a gap, 12 eta-0 samples (32 px, shown at 2x), with its name."""
    from PIL import Image, ImageDraw

    files = [samples_dir / f"faces-{i + 1}.npz" for i in range(num_faces)]
    files += [samples_dir / f"grayscale-{i + 1}.npz" for i in range(len(names) - num_faces)]
    cell, label_w = 64, 190
    sheet = Image.new("RGB", (label_w + cell * (2 * per_row + 1), cell * len(names)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, path) in enumerate(zip(names, files)):
        with np.load(path) as npz:
            for col, key in enumerate(("eta1", "eta0")):
                for i, image in enumerate(npz[key][:per_row]):
                    tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST)
                    sheet.paste(tile, (label_w + cell * (i + col * (per_row + 1)), row * cell))
        draw.text((4, row * cell + cell // 2 - 6), ("gray: " if row >= num_faces else "") + name, fill="black")
    return sheet
