"""The one progress reporter: long work (embedding, DAPT, fine-tuning, export checks, prediction) reports,
short work stays quiet.

On a terminal: a tqdm bar that appears only once the work has run `delay` seconds (so
quick passes draw nothing) and disappears when done. Elsewhere (a log file, CI, DVC's
captured output): one plain line every DOMAINTUNE_PROGRESS_SECONDS seconds (default 30)
such as "finetune seed 42: 120/400 steps (30%), 2.1 steps/s, about 2 min 13 s left, loss
0.4136", never a carriage-return bar. Lines go through the "domaintune" logger (a stage prints them with
its [stage] prefix), or to a command's own stream (`domaintune predict`: stderr, with a final line).
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
                 tty: bool | None = None, stream=None, interval: float | None = None, final: bool = False):
        """stream: plain lines go to this text stream (e.g. a command's stderr) instead of the logger;
        interval: seconds between lines (default DOMAINTUNE_PROGRESS_SECONDS); final: a line at close too
        (a command's own summary, where no stage line follows)."""
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.t0 = self.last = time.monotonic()
        self.start_n = self.n
        self.postfix: dict[str, str] = {}
        self.interval = _interval() if interval is None else interval
        self.stream, self.final = stream, final
        self.bar = None
        out = stream or sys.stderr
        if getattr(out, "isatty", lambda: False)() if tty is None else tty:
            from tqdm import tqdm  # lazy: only on a terminal

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=False, delay=delay,
                            dynamic_ncols=True, file=out)

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
            self._emit(self.line(now))

    def _emit(self, message: str) -> None:
        if self.stream is not None:
            print(message, file=self.stream, flush=True)
        else:
            log.info("%s", message)

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
        elif self.final:
            self.final = False
            self._emit(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
