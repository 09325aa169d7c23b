"""A hop-count curriculum: train on 1-hop problems first and admit deeper ones as they are learned.

Learning pointer chasing goes through plateaus (shared/RESEARCH.md; Loop, Think & Generalize
2026): the one-hop lookup is found after a few hundred steps of no progress, at a step that
varies from run to run. Mixing deeper problems in before it is found slowed it down in every
run measured here, so the curriculum moves on when the model is ready, not at a fixed step:
the largest hop count goes up by one once the mean training accuracy of the last `window`
steps at the current level reaches `accuracy`, or at the latest after `max_steps` steps there.
"""

from __future__ import annotations

from collections import deque


class HopCurriculum:
    def __init__(self, max_hops: int, max_steps: int, accuracy: float, window: int = 50) -> None:
        self.max_hops, self.max_steps, self.accuracy, self.window = max_hops, max_steps, accuracy, window
        self.enabled = max_steps > 0
        self.top = 1 if self.enabled else max_hops
        """The largest hop count trained now."""
        self._accs: deque[float] = deque(maxlen=window)
        self._steps_here = 0
        self.advances: list[tuple[int, int]] = []
        """(step, new top) of every advance."""

    def update(self, step: int, accuracy: float) -> bool:
        """Record one training step's accuracy; True when the curriculum moved up."""
        if not self.enabled or self.top >= self.max_hops:
            return False
        self._accs.append(accuracy)
        self._steps_here += 1
        ready = len(self._accs) == self.window and sum(self._accs) / self.window >= self.accuracy
        if ready or self._steps_here >= self.max_steps:
            self.top += 1
            self._accs.clear()
            self._steps_here = 0
            self.advances.append((step + 1, self.top))
            return True
        return False
