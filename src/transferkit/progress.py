"""Progress for long work: a tqdm bar on a terminal, plain periodic log lines when stderr is a file or a pipe.

A bar in a log file is thousands of carriage-return updates; a line a minute (and one at the end) is what a person
reading `train.log` or a CI log wants.
"""

from __future__ import annotations

import logging
import math
import sys
import time

from transferkit.budget import format_duration

log = logging.getLogger("transferkit")
LOG_EVERY_SECONDS = 60.0


def on_terminal() -> bool:
    return sys.stderr.isatty()


class LogLines:
    """The part of tqdm's interface transferkit uses, written as a log line every `every` seconds and at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = LOG_EVERY_SECONDS,
                 final_line: bool = True):
        self.total, self.desc, self.unit, self.every, self.final_line = total, desc, unit, every, final_line
        self.n, self.postfix = 0, ""
        self.started = self.last = time.perf_counter()

    def _line(self, finished: bool = False) -> str:
        seconds = time.perf_counter() - self.started
        rate = self.n / seconds if seconds > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = (f", ~{format_duration((self.total - self.n) / rate)} left"
               if self.total and rate > 0 and self.n < self.total and not finished else "")
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} {self.unit} in {format_duration(seconds)} ({rate:.1f} {self.unit}/s{eta}{postfix})"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            log.info("%s", self._line())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def write(self, text: str, file=None) -> None:  # noqa: ARG002 - tqdm's signature
        log.info("%s", text)

    def close(self) -> None:
        if self.n and self.final_line:
            log.info("%s", self._line(finished=True))


def progress_bar(total: int | None, desc: str, unit: str, progress: bool | None, quiet_when_empty: bool = False):
    """A bar when `progress` is True, or None on a terminal; plain log lines when None elsewhere; nothing when False.

    `quiet_when_empty`: no output at all for zero work (a warm cache).
    """
    if progress is False or (quiet_when_empty and not total):
        return LogLines(total, desc, unit, every=math.inf, final_line=False)
    if progress is None and not on_terminal():
        return LogLines(total, desc, unit)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the PyTorch-free runtime install has no tqdm: plain lines there
        return LogLines(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
