"""Progress of a long command, the one way every command shows it (generate, ingest, train,
evaluate, transform).

In a terminal: one live line on stderr with the count (``16/30 steps``), the time left, the
time elapsed, the throughput, the command's own figures (train's loss) and a bar. The line
is fitted to the terminal's width by dropping whole items, the least useful first (extra
figures, the throughput, the elapsed time, the bar, the first figure), never by cutting a
number in half: the count and the time left stay at any width.

Not a terminal (a pipe, a CI log): plain lines, no escape codes, no carriage returns, at a
steady pace (every step for train; for the commands that count chunks, about one line every
10 s, also while no chunk ends), and a final line::

    train: 12/50 steps · loss 0.3712 · 1.8 steps/s · elapsed 6.6s · eta ≤ 21s

``eta ≤`` marks a bound: training stops at its step limit or earlier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from cosim_dask.cli.output import is_quiet

#: Plain-line pace of the commands that count chunks, in seconds.
PLAIN_EVERY = 10.0
SEPARATOR = " · "
#: The narrowest bar worth drawing, and the widest drawn.
BAR_MIN, BAR_MAX = 10, 40


def duration(seconds: float) -> str:
    """``6.6s``, ``2m05s``, ``1h02m``: short enough for a narrow terminal."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class Tracker:
    """The state of one command's progress; the command calls :meth:`advance` (a count of
    rows done) or :meth:`update` (the count reached, with figures of its own)."""

    label: str
    total: int | None
    unit: str
    #: True when the total is a bound the run may stop short of (train's maximum steps).
    bound: bool = False
    #: False when the work reports no count until it ends (evaluate's one pass): the line
    #: shows the work and the time going by, no count, rate or time left that it cannot know.
    counted: bool = True
    completed: int = 0
    status: tuple[str, ...] = ()
    started: float = field(default_factory=time.monotonic)
    #: The count when the clock started: a resumed run's throughput counts its own steps.
    base: int = 0
    #: Set when the block ended well: no time left to show, the clock stopped.
    finished: float | None = None
    #: Throughput from the first update on (count, time), not from the start: train's first
    #: report (step 0) comes after the data are loaded, which says nothing of a step's time.
    rate_from_first: bool = False
    origin: tuple[int, float] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Called after every change (the plain lines' writer).
    listener: Callable[[], None] | None = field(default=None, repr=False)

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener()

    def advance(self, n: int) -> None:
        """``n`` more done."""
        with self.lock:
            self.completed += int(n)
        self._changed()

    def update(self, completed: int, status: Sequence[str] = ()) -> None:
        """``completed`` done so far, and the command's figures (most useful first)."""
        with self.lock:
            self.completed, self.status = int(completed), tuple(status)
            if self.rate_from_first and self.origin is None:
                self.origin = (self.completed, time.monotonic())
        self._changed()

    def start_at(self, completed: int) -> None:
        """Count from ``completed`` (a resumed run) and restart the clock there (no line
        of its own: the next update tells)."""
        with self.lock:
            self.completed = self.base = int(completed)
            self.started = time.monotonic()
            self.origin = None

    def finish(self) -> None:
        """The work is done (perhaps short of a bound): stop the clock."""
        with self.lock:
            self.finished = time.monotonic()

    def snapshot(self) -> tuple:
        """What a line tells besides the time: the count, the figures, whether done."""
        with self.lock:
            done = self.finished is not None or (self.total is not None
                                                 and self.completed >= self.total)
            return self.completed, self.status, done

    def items(self) -> list[tuple[int, str]]:
        """``(priority, text)`` in display order; a lower priority is dropped later."""
        with self.lock:
            done, status, base, started = self.completed, self.status, self.base, self.started
            now = self.finished or time.monotonic()
            if self.rate_from_first:
                base, since = self.origin or (done, now)
            else:
                since = started
        elapsed = now - started
        rate = (done - base) / (now - since) if now > since and done > base else None
        if not self.counted and self.finished is None:
            total = "" if self.total is None else f"{self.total:,} "
            return [(0, f"scoring {total}{self.unit}"),
                    *[(3 if k == 0 else 6 + k, s) for k, s in enumerate(status)],
                    (4, f"elapsed {duration(elapsed)}")]
        count = (f"{done:,}/{self.total:,} {self.unit}" if self.total is not None
                 else f"{done:,} {self.unit}")
        out = [(0, count)]
        out += [(3 if k == 0 else 6 + k, s) for k, s in enumerate(status)]
        if rate is not None:
            out.append((5, f"{rate:,.0f} {self.unit}/s" if rate >= 100
                        else f"{rate:.2g} {self.unit}/s"))
        out.append((4, f"elapsed {duration(elapsed)}"))
        if self.finished is not None or (self.total is not None and done >= self.total):
            out.append((2, "done"))
        elif self.total is not None and rate is not None:
            left = duration((self.total - done) / rate)
            out.append((2, f"eta ≤ {left}" if self.bound else f"eta {left}"))
        return out

    def fraction(self) -> float | None:
        if not self.total or not (self.counted or self.finished):
            return None
        with self.lock:
            return min(max(self.completed / self.total, 0.0), 1.0)

    def plain_line(self) -> str:
        """The line for a log: every item, no bar."""
        return f"{self.label}: " + SEPARATOR.join(text for _, text in self.items())

    def fitted(self, width: int) -> Text:
        """The terminal line in at most ``width`` cells: whole items, the least useful
        dropped first; the bar (worth drawing from BAR_MIN cells, after the count, the time
        left and the first figure) takes the room left, up to BAR_MAX."""
        items = self.items()
        fraction = self.fraction()
        label = Text(self.label, style="bold")

        def cells(keep: set[int], bar: int) -> int:
            texts = [Text(items[i][1]).cell_len for i in sorted(keep)]
            return (label.cell_len + (1 + bar if bar else 0)
                    + (1 + sum(texts) + len(SEPARATOR) * (len(texts) - 1) if texts else 0))

        keep: set[int] = set()
        bar = 0
        for priority, i in sorted((p, i) for i, (p, _) in enumerate(items)):
            if fraction is not None and not bar and priority > 3 \
                    and cells(keep, BAR_MIN) <= width:
                bar = BAR_MIN
            if cells(keep | {i}, bar) <= width:
                keep.add(i)
        if fraction is not None and not bar and cells(keep, BAR_MIN) <= width:
            bar = BAR_MIN
        if bar:
            bar = min(BAR_MAX, bar + width - cells(keep, bar))
        line = label.copy()
        if bar:
            filled = round(bar * fraction)
            line.append(" ")
            line.append("━" * filled, style="bar.complete" if fraction < 1 else "bar.finished")
            line.append("━" * (bar - filled), style="bar.back")
        shown = [items[i][1] for i in sorted(keep)]
        if shown:
            line.append(" " + SEPARATOR.join(shown))
        line.truncate(width)
        return line

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.fitted(options.max_width)


@contextmanager
def progress(label: str, total: int | None, unit: str, *, bound: bool = False,
             counted: bool = True, rate_from_first: bool = False, every: float = PLAIN_EVERY,
             keep: bool = False, console: Console | None = None) -> Iterator[Tracker]:
    """Show the progress of ``label`` while the block runs; yields its :class:`Tracker`.

    ``total`` None: no bar and no time left, the count alone. ``bound``, ``counted``,
    ``rate_from_first``: see :class:`Tracker`. ``every``: the plain lines' pace in seconds
    (0: a line at every update). ``keep``: leave the terminal line on the screen at the end
    (train's last figures), else remove it. Output goes to ``console`` (default: stderr);
    plain lines when it is not a terminal; nothing under ``--quiet``. The final line is
    written only when the block succeeds: after an error, the error is the last line.
    """
    console = console or Console(stderr=True)
    tracker = Tracker(label, total, unit, bound=bound, counted=counted,
                      rate_from_first=rate_from_first)
    if is_quiet():
        yield tracker
        return
    if console.is_terminal:
        with Live(tracker, console=console, refresh_per_second=4, transient=not keep) as live:
            yield tracker
            tracker.finish()
            live.refresh()
        return
    with _plain_lines(tracker, console.file, every):
        yield tracker


@contextmanager
def _plain_lines(tracker: Tracker, stream: IO[str], every: float) -> Iterator[None]:
    """Plain lines on ``stream``: at every update (``every`` 0), or at most one every
    ``every`` seconds and at least one every ``every`` seconds while the block runs (a
    chunk that takes minutes still shows the time going by); then the final line."""
    lock = threading.Lock()
    last = {"told": None, "at": time.monotonic()}
    stop = threading.Event()

    def write(force: bool = False) -> None:
        with lock:
            if not force and time.monotonic() - last["at"] < every:
                return
            told = tracker.snapshot()
            if force and told == last["told"]:  # the last line said it all ("done")
                return
            stream.write(tracker.plain_line() + "\n")
            stream.flush()
            last["told"], last["at"] = told, time.monotonic()

    def heartbeat() -> None:
        while not stop.wait(every):
            write()

    tracker.listener = write
    thread = None
    if every > 0:
        thread = threading.Thread(target=heartbeat, name=f"cosim-progress-{tracker.label}",
                                  daemon=True)
        thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        tracker.listener = None
        stop.set()
        if thread is not None:
            thread.join()
        if ok:
            tracker.finish()
            write(force=True)
