"""The one renderer: a Result as <name>.json (every repeat), <name>.md (targets, tables, method, notes) and its
plots; and the one sample sheet (labelled rows of images) the learning and quality benchmarks draw.

Everything in the report is in the JSON, so `write(record.load(path), dir)` redraws a committed result as measured.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.record import Plot, Result, Target
from pipeline.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text


def fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def targets_table(targets: list[Target]) -> str:
    rows = [[t.name, t.target, fmt(t.value), f"{t.op} {fmt(t.threshold)}", t.verdict] for t in targets]
    return markdown_table(["target", "what", "measured", "needed", "verdict"], rows)


def markdown(result: Result) -> str:
    m, size = result.machine, "quick" if result.quick else "full"
    out = [f"# {result.benchmark}", "", f"`{result.command}` · {result.date} · {size} run on {result.device}", ""]
    out += [f"Machine: {m.line()}; load average at start {m.load_average}."]
    out += ["Versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items() if v), ""]
    if result.targets:
        out += ["## Targets", "", targets_table(result.targets), ""]
        out += [f"- **{t.name}**: {t.detail}" for t in result.targets if t.detail] + [""]
    for tab in result.tables:
        out += [f"## {tab.title}", "", markdown_table(tab.columns, tab.rows), ""]
    out += [f"![{name}]({name})\n" for name in [p.file for p in result.plots] + result.images]
    if result.method:
        out += ["## Method", "", result.method.strip(), ""]
    if result.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    return "\n".join(out)


def draw(plot: Plot, path: Path) -> None:
    """The plot as a PNG, written atomically."""
    import matplotlib  # heavy, and only for the runs that draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the file-only backend

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for label, (xs, ys) in plot.series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(title=plot.title, xlabel=plot.xlabel, ylabel=plot.ylabel)
    if plot.logx:
        ax.set_xscale("log", base=plot.logx)
    if plot.logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write(result: Result, out_dir: str | Path) -> Path:
    """<out>/<name>.json, <out>/<name>.md and every plot, each written atomically; returns the .md path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for plot in result.plots:
        draw(plot, out_dir / plot.file)
    # field order kept (not sorted): the record reads in the order it was measured
    text = json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False)
    atomic_write_text(out_dir / f"{result.benchmark}.json", text + "\n")
    atomic_write_text(out_dir / f"{result.benchmark}.md", markdown(result))
    return out_dir / f"{result.benchmark}.md"


def summary(results: list[Result], out_dir: Path, seconds: float) -> None:
    """summary.md and summary.json: every target of a multi-benchmark run."""
    targets, first = [t for r in results for t in r.targets], results[0]
    md = ["# Benchmark summary", "", f"`{first.command}` · {first.date} · {seconds / 60:.1f} min", ""]
    md += [f"Machine: {first.machine.line()}", "", targets_table(targets), ""]
    md += ["Details: " + ", ".join(f"[{r.benchmark}]({r.benchmark}.md)" for r in results), ""]
    atomic_write_text(out_dir / "summary.md", "\n".join(md))
    record = {"command": first.command, "date": first.date, "seconds": seconds, "machine": first.machine}
    record |= {"versions": first.versions, "benchmarks": [r.benchmark for r in results], "targets": targets}
    atomic_write_json(out_dir / "summary.json", json.loads(json.dumps(record, default=dataclasses.asdict)))


def sample_sheet(rows: list[tuple[str, list[np.ndarray | None]]], path: Path, cell: int = 64, pad: int = 2) -> None:
    """One row per label: its uint8 (H, W, C) images at the integer scale nearest `cell` px (nearest neighbour:
    pixels stay pixels), `pad` px apart; a None leaves a gap. Written atomically."""
    h, w = next(image for _, images in rows for image in images if image is not None).shape[:2]
    th, tw, label_w = h * max(1, cell // h), w * max(1, cell // h), 8 + 6 * max(len(label) for label, _ in rows)
    sheet = Image.new("RGB", (label_w + max(len(i) for _, i in rows) * (tw + pad), len(rows) * (th + pad)), "white")
    for r, (label, images) in enumerate(rows):
        ImageDraw.Draw(sheet).text((4, r * (th + pad) + th // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            if image is not None:
                tile = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
                sheet.paste(tile.resize((tw, th), Image.Resampling.NEAREST), (label_w + c * (tw + pad), r * (th + pad)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
