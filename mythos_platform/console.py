"""What a job shows in the terminal: this project's lines and progress; library output goes to a log.

A job started from a terminal (or by `ray job submit`) prints its own lines (stage banners,
training progress, results, errors) and writes everything else (Ray's worker and raylet
messages, Tune's status tables, Ray Data's plans, MLflow's and other libraries' logging and
warnings) to `<run root>/logs/<job>.log`, saying once where that file is. Nothing is dropped:
the log holds every line, the project's included. `--verbose` (or MYTHOS_VERBOSE=1) shows
everything in the terminal as before.

How a line is told apart:
- written from Python: by the module that called `print` / `logging` / `warnings.warn` (the first
  frame outside logging, warnings and traceback): this project's packages are shown;
- forwarded by Ray from a worker process (`(RayTrainWorker pid=...) text`): shown when the text is
  one of this project's lines (it carries a `[mythos` tag), without Ray's prefix;
- written by C++ code straight to file descriptor 1 or 2 (raylet, core worker): the descriptors
  point at the log file, so these never reach the terminal;
- an uncaught exception's traceback: shown (whichever excepthook prints it).

Progress: training step lines (`[mythos <run>] step 50/600 | ...`) and the `progress` calls of
the sweep and the evaluation become live bars (tqdm: count, rate, ETA, the latest figures) when
the terminal is a TTY, and stay plain periodic lines otherwise (CI, `ray job logs`, pipes).
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from pathlib import Path
from typing import TextIO

OURS = ("mythos", "mythos_platform", "jobs", "evals", "__main__")
"""Top-level modules whose output is this project's."""
_PASS_THROUGH = ("logging", "warnings", "traceback", "mythos_platform.console",
                 # libraries that replace builtins.print in the driver and call the original print
                 # (Ray Train V2 once a trainer has run there; Serve; Ray's tqdm)
                 "ray.train.v2._internal.logging", "ray.serve._private.logging_utils", "ray.experimental.tqdm_ray")
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?P<who>[\w.:-]+)(?: pid=\d+)?(?:, ip=[\d.]+)?\)(?:\x1b\[[0-9;]*m)* ?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DEDUP = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
STEP_LINE = re.compile(r"\[mythos(?: (?P<run>[^\]]+))?\] step\s+(?P<step>\d+)/(?P<steps>\d+) \| (?P<rest>.*)$")
"""A training step line (`mythos_platform.train.metrics.progress_line`)."""
_TAG = re.compile(r"^\[mythos[^\]]*\]\s*|^\[\s*\d+/\d+\]\s*")

_active: "Router | None" = None


def _caller_is_ours(depth: int) -> bool:
    """Whether the code that wrote (through print/logging/warnings) is this project's; True when
    no Python code did (the interpreter printing an uncaught exception)."""
    try:
        frame = sys._getframe(depth)
    except ValueError:
        return True
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(_PASS_THROUGH) and module != "builtins":
            return module.split(".")[0] in OURS
        frame = frame.f_back
    return True


class _Bars:
    """Live progress bars by key on the terminal (tqdm); None of this when it is not a TTY."""

    def __init__(self, term: TextIO) -> None:
        from tqdm import tqdm

        self._tqdm, self._term, self._bars = tqdm, term, {}

    def update(self, key: str, done: int, total: int, text: str, unit: str) -> None:
        bar = self._bars.get(key)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            # `initial`: the rate and ETA count only the progress seen while the bar is up (a run
            # resumed at step 200, or first heard of at its first logged step, did not do it in 0 s)
            bar = self._bars[key] = self._tqdm(total=total, initial=min(done, total), desc=key, unit=unit,
                                               file=self._term, leave=True, ncols=self._width(),
                                               bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} {unit} "
                                                          "[{elapsed}<{remaining}]{postfix}")
        bar.n = min(done, total)
        bar.set_postfix_str(text, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            del self._bars[key]

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self._term.fileno()).columns or 120
        except OSError:
            return 120

    def write(self, line: str) -> None:
        self._tqdm.write(line, file=self._term)

    def finish(self, key: str | None = None) -> None:
        """Close the bar of `key` (a run the scheduler stopped before its last step), or all."""
        for k in [key] if key is not None else list(self._bars):
            bar = self._bars.pop(k, None)
            if bar is not None:
                bar.close()


class Router(io.TextIOBase):
    """sys.stdout / sys.stderr of a routed job: every line to the log, this project's to the terminal."""

    def __init__(self, term: TextIO, log: TextIO, bars: _Bars | None) -> None:
        self.term, self.log, self.bars = term, log, bars
        self._pending: dict[int, tuple[str, bool]] = {}
        self.forced = False
        """Set while an uncaught exception is reported: its traceback is shown whoever prints it."""
        self._lock = threading.Lock()

    # the file-like surface libraries use
    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # libraries then print plainly (no colours, no redraws) into the log
        return False

    def fileno(self) -> int:  # a subprocess given sys.stdout writes into the log
        return self.log.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, s: str) -> int:
        ours = self.forced or _caller_is_ours(2)
        tid = threading.get_ident()
        with self._lock:
            text, was_ours = self._pending.pop(tid, ("", False))
            text, ours = text + s, ours or was_ours
            *lines, rest = text.split("\n")
            for line in lines:
                self._line(line, ours)
            if rest:
                self._pending[tid] = (rest, ours)
        return len(s)

    def flush(self) -> None:
        with self._lock:
            self.log.flush()
            self.term.flush()

    def _line(self, line: str, ours: bool) -> None:
        self.log.write(line + "\n")
        m = _RAY_PREFIX.match(line)
        if m:  # forwarded from a Ray process: shown only if it is one of this project's lines
            text = _DEDUP.sub("", _ANSI.sub("", line[m.end():]))
            if "[mythos" not in text:
                return
            line, ours = text, True
        if not ours:
            return
        step = STEP_LINE.search(line)
        if step and self.bars is not None:
            run = step["run"] or "training"
            self.bars.update(run, int(step["step"]), int(step["steps"]), step["rest"], "steps")
            return
        self._show(line)

    def _show(self, line: str) -> None:
        if self.bars is not None:
            self.bars.write(line)
        else:
            self.term.write(line + "\n")
            self.term.flush()

    def progress(self, key: str, done: int, total: int, line: str, unit: str, status: str | None = None) -> None:
        with self._lock:
            self.log.write(line + "\n")
            if self.bars is not None:
                self.bars.update(key, done, total, _TAG.sub("", line) if status is None else status, unit)
            else:
                self._show(line)


def progress(key: str, done: int, total: int, line: str, unit: str = "", status: str | None = None) -> None:
    """Report `done` of `total` for `key` (e.g. "sweep", "evaluation"): a live bar on a routed TTY
    (showing `status` beside the count, default `line`), else `line` printed as it is."""
    if _active is not None:
        _active.progress(key, done, total, line, unit, status)
    else:
        print(line, flush=True)


def finish(key: str | None = None) -> None:
    """Done with the progress of `key` (or of everything, e.g. at a new stage) although it did not
    reach its total: its bar is closed where it stands."""
    if _active is not None and _active.bars is not None:
        with _active._lock:
            _active.bars.finish(key)


def log_path(root: str | os.PathLike, job: str) -> Path:
    return Path(root).expanduser().resolve() / "logs" / f"{job}.log"


def verbose_requested() -> bool:
    return os.environ.get("MYTHOS_VERBOSE", "").lower() in ("1", "true", "yes")


def route_output(root: str | os.PathLike, job: str, verbose: bool = False) -> Path | None:
    """Route this process's output for the rest of its life (see the module docstring); returns the
    log's path, or None when nothing was routed: `verbose`, or the standard streams are not the
    process's own (a test capturing them, a notebook)."""
    global _active
    if verbose or verbose_requested() or _active is not None:
        return None
    if sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        return None
    path = log_path(root, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    term = os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8", errors="replace")
    os.dup2(log.fileno(), 1)  # what C++ code and child processes write
    os.dup2(log.fileno(), 2)
    bars = _Bars(term) if term.isatty() and os.environ.get("TERM") != "dumb" else None
    _active = Router(term, log, bars)
    sys.stdout = sys.stderr = _active  # type: ignore[assignment]
    sys.excepthook = _show_uncaught(sys.excepthook)
    term.write(f"[mythos] library output (Ray, Tune, MLflow, warnings) goes to {path}; "
               "--verbose shows it here\n")
    term.flush()
    return path


def _show_uncaught(previous):
    """An excepthook around `previous` (Ray wraps the hook it finds at import: ours, or it is ours)
    whose traceback reaches the terminal, though a library's hook prints it."""
    def hook(kind, value, tb):
        if _active is not None:
            _active.forced = True
        try:
            previous(kind, value, tb)
        finally:
            if _active is not None:
                _active.forced = False
    return hook


def routed_log() -> Path | None:
    """The log file of a routed process, or None."""
    return Path(_active.log.name) if _active is not None else None
