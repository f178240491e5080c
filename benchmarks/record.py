"""Typed records of a benchmark run: the machine, the repeats, the targets, and what the report shows.

A benchmark returns one `Result` holding its own measured record (a dataclass) beside the tables,
targets and plots built from it; benchmarks.render writes it as JSON with `dataclasses.asdict` and
`load` reads it back, so a committed result can be re-rendered without measuring it again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Spread:
    """Median and spread of repeats: interquartile range, min, max, and every value."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    repeats: list[float]

    def text(self, digits: int = 2, percent: bool = False) -> str:
        """'median [q1–q3]', in per cent where asked."""
        scale, unit = (100, " %") if percent else (1, "")
        return f"{scale * self.median:.{digits}f}{unit} [{scale * self.q1:.{digits}f}–{scale * self.q3:.{digits}f}]"


def summarize(values: list[float]) -> Spread:
    values = [float(v) for v in values]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) >= 2 else values * 3
    return Spread(statistics.median(values), q1, q3, min(values), max(values), values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> Spread:
    """Median (and spread) of round-by-round ratios: robust to load that drifts between rounds."""
    return summarize([a / b for a, b in zip(numerator, denominator)])


@dataclass
class Target:
    """A target from the issue and whether this run met it; `missed_by` is relative to the threshold."""

    name: str
    target: str
    value: float | None
    threshold: float
    op: str  # ">=" or "<="
    unit: str = "x"
    met: bool | None = None
    missed_by: float | None = None
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "n/a"
        return "met" if self.met else f"missed by {100 * (self.missed_by or 0):.0f} %"


def target(name: str, what: str, value: float | None, threshold: float, op: str, unit: str = "x", detail: str = ""):
    if value is None or math.isnan(value):
        return Target(name, what, None, threshold, op, unit, detail=detail or "not measured on this machine")
    met = value >= threshold if op == ">=" else value <= threshold
    return Target(
        name, what, value, threshold, op, unit, met, 0.0 if met else abs(value - threshold) / threshold, detail
    )


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]


def table(title: str, columns: str, rows: list[list]) -> Table:
    """A table whose columns are written as a Markdown header: "config | batch | images/s" (" | " between them)."""
    return Table(title, [c.strip() for c in columns.split(" | ")], rows)


@dataclass
class Plot:
    """A line plot written as <file>: one line per series (label -> [xs, ys]); logx is the x log base (0: linear)."""

    file: str
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[list[float]]]
    logx: int = 0
    logy: bool = False

    @classmethod
    def by_batch(cls, file: str, title: str, ylabel: str, rows: list[tuple[str, int, dict[str, float]]], logy: bool):
        """Images/s against batch size from rows (config, batch, {label: images/s}): a line per label and
        config measured at two batches or more; None where no config was."""
        series: dict[str, list[list[float]]] = {}
        for config in dict.fromkeys(c for c, _, _ in rows):
            mine = sorted((r for r in rows if r[0] == config), key=lambda r: r[1])
            for label in mine[0][2] if len(mine) > 1 else []:
                series[f"{label} {config}"] = [[b for _, b, _ in mine], [rates[label] for _, _, rates in mine]]
        return cls(file, title, "batch size", ylabel, series, logx=2, logy=logy) if series else None


@dataclass
class Machine:
    cpu: str
    cores: int
    logical_cpus: int | None
    ram_gib: float | None
    platform: str
    hostname: str
    torch_threads: int
    cuda_available: bool
    gpu: str | None = None
    load_average: list[float] | None = None
    gpu_memory_gib: float | None = None
    cuda: str | None = None

    def line(self) -> str:
        gpu = f", GPU {self.gpu}" if self.gpu else ", no GPU"
        return f"{self.cpu}, {self.cores} cores, {self.ram_gib} GiB RAM{gpu}"


@dataclass
class Result:
    """One run of one benchmark: its `results` record (the measurements) and what the report shows of them."""

    benchmark: str
    date: str
    command: str
    quick: bool
    device: str
    machine: Machine
    versions: dict[str, str | None]
    config: dict[str, Any]
    method: str
    results: Any = None
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # pictures the benchmark drew itself (sample sheets)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add_target(self, name: str, what: str, value: float | None, threshold: float, op: str, unit="x", detail=""):
        self.targets.append(target(name, what, value, threshold, op, unit, detail))


def from_json(kind: Any, data: Any) -> Any:
    """A record of type `kind` from its JSON form (what dataclasses.asdict wrote), nested records included."""
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(
            **{f.name: from_json(hints[f.name], data[f.name]) for f in dataclasses.fields(kind) if f.name in data}
        )
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):  # None, a value, or the first record whose fields the data has
        fits = [
            a for a in args if typing.get_origin(a) in (list, dict) or dataclasses.is_dataclass(a) and _has(a, data)
        ]
        return from_json(fits[0], data) if data is not None and fits else data
    if origin is list:
        return [from_json(args[0], x) for x in data]
    if origin is dict:
        return {k: from_json(args[1], v) for k, v in data.items()}
    return data


def _has(kind: Any, data: Any) -> bool:
    """The data holds every field of the record that has no default."""
    none = dataclasses.MISSING
    required = [f.name for f in dataclasses.fields(kind) if f.default is none and f.default_factory is none]
    return isinstance(data, dict) and all(name in data for name in required)


def load(path: str | Path, results: Any = None) -> Result:
    """A result written by benchmarks.render; `results`: the type of its measured record (default: left as JSON)."""
    result = from_json(Result, json.loads(Path(path).read_text()))
    result.results = result.results if results is None else from_json(results, result.results)
    return result
