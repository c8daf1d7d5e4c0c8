"""Progress for long work (embedding, DAPT, fine-tuning, export checks, prediction), quiet for short work.

On a terminal: a tqdm bar that appears only once the work has run `delay` seconds (so
quick passes draw nothing) and disappears when done. Elsewhere (a log file, CI, DVC's
captured output): one plain line every DOMAINTUNE_PROGRESS_SECONDS seconds (default 30)
such as "finetune seed 42: 120/400 steps (30%), 2.1 steps/s, about 2 min 13 s left, loss
0.4136", never a carriage-return bar. Lines go through the "domaintune" logger, so a
stage prints them with its [stage] prefix.
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("domaintune.progress")


def _duration(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 60} min {sec % 60} s" if sec >= 60 else f"{sec} s"


def _interval() -> float:
    try:
        return max(float(os.environ.get("DOMAINTUNE_PROGRESS_SECONDS", "30")), 0.0)
    except ValueError:
        return 30.0


class Progress:
    """progress = Progress(total, "finetune seed 42"); progress.update(1, loss="0.41"); progress.close()."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, delay: float = 2.0,
                 tty: bool | None = None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.t0 = self.last = time.monotonic()
        self.start_n = self.n
        self.postfix: dict[str, str] = {}
        self.interval = _interval()
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=False, delay=delay,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if postfix:
            self.postfix = {k: str(v) for k, v in postfix.items()}
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.t0
        done = self.n - self.start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}" if rate else ""]
        if rate > 0 and self.total > self.n:
            parts.append(f"about {_duration((self.total - self.n) / rate)} left")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return ", ".join(p for p in parts if p)

    def write(self, message: str) -> None:
        """Log a line (e.g. an epoch's results) without tearing a bar that is on screen."""
        if self.bar is not None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stderr):
                log.info("%s", message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
