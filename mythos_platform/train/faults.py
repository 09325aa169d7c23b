"""Fault injection for the recovery tests: training workers kill themselves (SIGKILL), or the
loss turns non-finite (a diverged run).

Nothing in the platform's API knows about faults. A test arms them through the environment:
`MYTHOS_FAULT_FILE` names a JSON file

    {"kill_at_step": 12, "marker": "/tmp/.../killed", "rank": 1, "wait_s": 5}
    {"kills": [{"step": 11, "rank": 0, "marker": "/tmp/.../k1"}, {"step": 19, "rank": 1, "marker": ...}],
     "wait_s": 3}
    {"nan_from_step": 3}

A kill happens after the optimizer step's metrics and report ("rank" defaults to the last rank);
"nan_from_step" makes every step from then on NaN on all ranks. "wait_s" (default 0) delays a
kill: Ray Train registers a reported checkpoint only when its controller next polls the workers
(every 2 s), so a test that means to resume from the last checkpoint waits that long.

The variable must be set before the Ray cluster starts, so that every worker process inherits
it; the file only has to exist when the run's workers start, so a test writes it for the one
run it means to break. The worker writes a kill's `marker` just before it dies, and a kill whose
marker exists is spent: the restarted workers (and later runs) go past that step undisturbed.
With the variable unset, as in every real run, nothing happens.
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
class Kill:
    step: int
    """The worker dies right after this optimizer step's metrics and report."""
    rank: int
    marker: Path


@dataclass(frozen=True)
class Fault:
    kills: tuple[Kill, ...] = ()
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
        kills = list(spec.get("kills", []))
        if spec.get("kill_at_step") is not None:
            kills.append({"step": spec["kill_at_step"], "rank": spec.get("rank"), "marker": spec["marker"]})
        nan = spec.get("nan_from_step")
        return cls(tuple(Kill(int(k["step"]), int(world - 1 if k.get("rank") is None else k["rank"]),
                              Path(k["marker"])) for k in kills),
                   float(spec.get("wait_s", 0.0)), None if nan is None else int(nan))

    def loss_factor(self, step: int) -> float:
        """What the loss of optimizer step `step` (1-based) is multiplied by: NaN once poisoned."""
        return float("nan") if self.nan_from_step is not None and step >= self.nan_from_step else 1.0

    def maybe_kill(self, step: int, rank: int) -> None:
        """SIGKILL this process (a real process death) if a kill is armed for this step and rank, once."""
        for kill in self.kills:
            if kill.step == step and kill.rank == rank and not kill.marker.exists():
                time.sleep(self.wait_s)
                kill.marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
