"""Progress of long work: tqdm on a terminal, otherwise a log line at most every `interval` seconds.

Imports neither torch nor (without a terminal) tqdm: the standalone sampler runs with numpy and
an engine alone, and data_prep, free of torch, reports its images through it too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Progress:
    """update() per unit of work; `line(self)` is the log line printed when there is no terminal."""

    def __init__(
        self,
        total: int,
        line: Callable[[Progress], str],
        *,
        unit: str = "step",
        initial: int = 0,
        interval: float = 10.0,
        quiet: bool = False,
    ):
        self.total, self.done, self.first, self.line = total, initial, initial, line
        self.interval, self.quiet, self.text = interval, quiet, ""
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() and not quiet:
            try:
                from tqdm import tqdm  # optional: the core is numpy + stdlib; tqdm only on a terminal

                self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=sys.stderr)
            except ImportError:  # the standalone sampler needs only numpy + an engine
                pass

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        """Units per second since this Progress started (units done before it not counted)."""
        return (self.done - self.first) / max(self.elapsed, 1e-9)

    def describe(self, text: str) -> None:
        self.text = text
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if not self.quiet and (now - self.last >= self.interval or self.done >= self.total):
            self.last = now
            print(self.line(self), file=sys.stderr, flush=True)

    def __call__(self, *_) -> None:
        """One unit done: usable directly as a per-step callback."""
        self.update()

    def close(self) -> float:
        """Close the bar; returns the seconds since the start."""
        if self.bar is not None:
            self.bar.close()
        return self.elapsed
