"""The sweep's progress for a person: one line (or a live bar) per trial that starts or ends.

    [mythos] sweep 2/4 trials done (1 stopped early by ASHA), 2 running | trial 00003 stopped early at step 80: val_acc 0.412

Counted from the trial list Tune passes to every callback (not from counters of its own), so a
resumed sweep counts the trials finished before the interruption too. A trial that ended without
its final report (`completed`) was stopped by the scheduler: that is said in words, with the step
it reached, so its figure is not read as a finished trial's.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from ..console import finish, progress


def _short(trial_id: str) -> str:
    return trial_id.rsplit("_", 1)[-1]


class SweepProgress(Callback):
    def __init__(self, metric: str, total: int, keys: list[str], name: str = "") -> None:
        self.metric, self.total, self.keys, self.name = metric, total, keys, name

    def _ended(self, trial: Any) -> None:
        """The trial's training bar ends where the trial did (its run is `<sweep>-<trial id>`)."""
        finish(f"{self.name}-{trial.trial_id}")

    def _values(self, trial: Any) -> str:
        cfg = trial.config or {}
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={cfg[k]}" for k in self.keys if k in cfg)

    def _say(self, trials: list, trial: Any, now: str, text: str) -> None:
        """`now`: the status the event gives `trial` (Tune calls back before it sets the status)."""
        status = {t.trial_id: t.status for t in trials}
        status[trial.trial_id] = now
        done = [t for t in trials if status[t.trial_id] in ("TERMINATED", "ERROR")]
        early = sum(1 for t in done if status[t.trial_id] == "TERMINATED"
                    and not (t.last_result or {}).get("completed"))
        running = sum(1 for s in status.values() if s == "RUNNING")
        total = max(self.total, len(trials))
        line = (f"[mythos] sweep {len(done)}/{total} trials done"
                f"{f' ({early} stopped early by the scheduler)' if early else ''}, {running} running | {text}")
        status = f"{running} running{f', {early} stopped early' if early else ''} | {text}"
        progress("sweep", len(done), total, line, "trials", status)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trials, trial, "RUNNING", f"trial {_short(trial.trial_id)} started ({self._values(trial)})")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        value = r.get(self.metric)
        figure = f"{self.metric} {value:.3f}" if isinstance(value, (int, float)) else f"no {self.metric} yet"
        how = "finished" if r.get("completed") else "stopped early by the scheduler"
        self._ended(trial)
        self._say(trials, trial, "TERMINATED", f"trial {_short(trial.trial_id)} {how} at step "
                                               f"{r.get('step', '?')}: {figure} ({self._values(trial)})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)
        self._say(trials, trial, "ERROR",
                  f"trial {_short(trial.trial_id)} failed ({self._values(trial)}); its error is in the log")
