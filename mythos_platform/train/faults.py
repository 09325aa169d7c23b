"""Fault injection for the recovery tests: a training worker kills itself (SIGKILL) once.

Nothing in the platform's API knows about faults. A test arms one through the environment:
`MYTHOS_FAULT_FILE` names a JSON file

    {"kill_at_step": 12, "marker": "/tmp/.../killed", "rank": 1, "wait_s": 5}

("rank" defaults to the last rank). "wait_s" (default 0) delays the kill: Ray Train registers
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
    kill_at_step: int
    """The worker dies right after this optimizer step (before its metrics or checkpoint)."""
    marker: Path
    rank: int
    wait_s: float = 0.0

    @classmethod
    def from_env(cls, world: int) -> Fault | None:
        """The armed fault, or None. The one place that reads `MYTHOS_FAULT_FILE`."""
        path = os.environ.get(FAULT_FILE_ENV)
        if not path or not Path(path).is_file():
            return None
        spec = json.loads(Path(path).read_text())
        return cls(int(spec["kill_at_step"]), Path(spec["marker"]), int(spec.get("rank", world - 1)),
                   float(spec.get("wait_s", 0.0)))

    def maybe_kill(self, step: int, rank: int) -> None:
        """SIGKILL this process (a real process death) if this is the step and rank, once."""
        if step != self.kill_at_step or rank != self.rank or self.marker.exists():
            return
        time.sleep(self.wait_s)
        self.marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
