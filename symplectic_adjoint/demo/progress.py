"""Progress that shows wherever the output goes: a bar on a terminal, lines elsewhere.

On a terminal a tqdm bar redraws in place. Written to a file (CI logs, notebooks,
``nohup``) a redrawn bar shows nothing until the end, so there the same progress is a
plain line every few seconds: ``training: 240/800 (30%), 14 s, ~31 s left, nll=1.912``.
Both go to stderr; the program's results go to stdout. tqdm (the ``[demo]`` extra) is
optional: without it a terminal gets the lines too.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

__all__ = ["MODES", "Progress", "choose_mode"]

#: ``"bar"`` (tqdm, redrawn in place), ``"lines"`` (periodic lines), ``"off"``.
MODES = ("bar", "lines", "off")


def choose_mode(*, enabled: bool = True, stream: IO[str] | None = None) -> str:
    """``"off"`` unless ``enabled``; else ``"bar"`` on a terminal, ``"lines"`` elsewhere."""
    if not enabled:
        return "off"
    stream = sys.stderr if stream is None else stream
    return "bar" if stream.isatty() else "lines"


class Progress:
    """Progress of one phase of ``total`` items (``None``: unknown), used as a context manager.

    ``update(n, status)`` advances by ``n`` and shows ``status`` (e.g. the running loss or
    what is being measured). In ``"lines"`` mode a line is printed on the first update,
    then at most every ``every`` seconds, and once when the phase ends.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        mode: str,
        every: float = 10.0,
        unit: str = "it",
        stream: IO[str] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.desc, self.total, self.every = desc, total, every
        self.done, self.status = 0, ""
        self._stream = sys.stderr if stream is None else stream
        self._start = time.perf_counter()
        self._last_line: float | None = None
        self._shown = 0  # the count in the last line printed
        self._first: tuple[float, int] | None = None  # time and count of the first line
        self._bar: Any = None
        self._mode = mode
        if mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self._mode = "lines"
            else:
                self._bar = tqdm(
                    total=total, desc=desc, unit=unit, file=self._stream, dynamic_ncols=True
                )

    def update(self, n: int = 1, status: str = "") -> None:
        """Advance by ``n`` items; ``status`` replaces the text shown after the count."""
        self.done += n
        self.status = status or self.status
        if self._bar is not None:
            self._bar.set_postfix_str(self.status, refresh=False)
            self._bar.update(n)
        elif self._mode == "lines":
            now = time.perf_counter()
            if self._last_line is None or now - self._last_line >= self.every:
                self._line(now)

    def close(self) -> None:
        """End the phase: close the bar, or print the final line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._mode == "lines" and self.done != self._shown:
            self._line(time.perf_counter())
        self._mode = "off"

    def _line(self, now: float) -> None:
        elapsed = now - self._start
        count = f"{self.done}"
        timing = f"{elapsed:.0f} s"
        if self._first is None:
            self._first = (now, self.done)  # the rate excludes the first items (warm-up)
        if self.total:
            count += f"/{self.total} ({100 * self.done / self.total:.0f}%)"
            since, done_then = self._first
            if done_then < self.done < self.total:
                rate = (now - since) / (self.done - done_then)
                timing += f", ~{rate * (self.total - self.done):.0f} s left"
        text = f"{self.desc}: {count}, {timing}" + (f", {self.status}" if self.status else "")
        print(text, file=self._stream, flush=True)
        self._last_line, self._shown = now, self.done

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
