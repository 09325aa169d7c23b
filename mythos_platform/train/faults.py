"""Fault injection for the recovery tests: a training worker kills itself (SIGKILL) once, or the
loss turns non-finite (a diverged run).

Nothing in the platform's API knows about faults. A test arms one through the environment:
`MYTHOS_FAULT_FILE` names a JSON file

    {"kill_at_step": 12, "marker": "/tmp/.../killed", "rank": 1, "wait_s": 5}
    {"nan_from_step": 3}

("rank" defaults to the last rank; "nan_from_step" makes every step from then on NaN on all ranks). "wait_s" (default 0) delays the kill: Ray Train registers
a reported checkpoint only when its controller next polls the workers (every 2 s), so a test
that means to resume from the last checkpoint waits that long before the worker dies.

The variable must be set before the Ray cluster starts, so that every worker process inherits
it; the file only has to exist when the run's workers start, so a test writes it for the one
run it means to break. The worker writes `marker` just before it dies, and a fault whose marker
exists is spent: the restarted workers (and later runs) train undisturbed. With the variable
unset, as in every real run, nothing happens.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

FAULT_FILE_ENV = "MYTHOS_FAULT_FILE"


@dataclass(frozen=True)
class Fault:
    kill_at_step: int | None
    """The worker dies right after this optimizer step (before its metrics or checkpoint)."""
    marker: Path | None
    rank: int
    wait_s: float = 0.0
    nan_from_step: int | None = None
    """Optimizer steps (1-based) from this one on have a NaN loss."""

    @classmethod
    def from_env(cls, world: int) -> Fault | None:
        """The armed fault, or None. The one place that reads `MYTHOS_FAULT_FILE`."""
        path = os.environ.get(FAULT_FILE_ENV)
        if not path or not Path(path).is_file():
            return None
        spec = json.loads(Path(path).read_text())
        kill, nan = spec.get("kill_at_step"), spec.get("nan_from_step")
        return cls(None if kill is None else int(kill), Path(spec["marker"]) if "marker" in spec else None,
                   int(spec.get("rank", world - 1)), float(spec.get("wait_s", 0.0)),
                   None if nan is None else int(nan))

    def loss_factor(self, step: int) -> float:
        """What the loss of optimizer step `step` (1-based) is multiplied by: NaN once poisoned."""
        return float("nan") if self.nan_from_step is not None and step >= self.nan_from_step else 1.0

    def maybe_kill(self, step: int, rank: int) -> None:
        """SIGKILL this process (a real process death) if this is the step and rank, once."""
        if self.kill_at_step is None or step != self.kill_at_step or rank != self.rank or self.marker.exists():
            return
        time.sleep(self.wait_s)
        self.marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
