"""Time limits: parsing `--time-limit` and keeping a run's clock, across `--resume` too."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from transferkit.errors import DataError

_DURATION = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?:in)?)?(?:(?P<s>\d+(?:\.\d+)?)s?)?$")


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds from `90`, `90s`, `20m`, `1h30m`, `1h30m15s` or a number of seconds; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        match = _DURATION.match(text)
        if not text or match is None or not any(match.groupdict().values()):
            raise DataError(f"time_limit (--time-limit) takes a duration such as 90s, 20m, 1h30m or plain seconds, "
                            f"not {value!r}.")
        parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
        seconds = parts["h"] * 3600 + parts["m"] * 60 + parts["s"]
    if not seconds > 0 or seconds == float("inf"):
        raise DataError(f"time_limit (--time-limit) must be a positive duration (e.g. 90s, 20m, 1h30m), "
                        f"not {value!r}.")
    return seconds


def format_duration(seconds: float) -> str:
    """`42 s`, `7 min 5 s`, `1 h 12 min`: for messages."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def finish_time(seconds_from_now: float) -> str:
    """The wall-clock time `seconds_from_now` from now, e.g. 14:32."""
    return time.strftime("%H:%M", time.localtime(time.time() + seconds_from_now))


@dataclass
class Clock:
    """A run's clock: seconds spent so far (earlier sessions of a resumed run included) and, with a limit, what is
    left of it."""

    limit: float | None = None
    spent_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def left(self) -> float:
        """Seconds left before the limit (infinite without one; negative once past it)."""
        return float("inf") if self.limit is None else self.limit - self.elapsed()
