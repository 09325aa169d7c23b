"""What a finished sweep must not leave behind on the cluster: placement groups, trainer actors, workers.

Stopped Tune trials kill their trial actor; the Ray Train controller and its workers are owned by
it and die with it, and their placement groups are removed (this needs the dashboard's state
API). `leftovers` reads the cluster state and waits a little for that to settle.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("mythos.tune")

# actor classes a training run or sweep starts: the Tune trial (function trainable), Ray Train's
# controller and workers, and Ray Data's dataset manager and split coordinator that feed the workers
SWEEP_ACTOR_CLASSES = ("ImplicitFunc", "_trial", "TrainController", "RayTrainWorker", "DatasetManager",
                       "SplitCoordinator")


@dataclass
class Leftovers:
    placement_groups: list[str] = field(default_factory=list)
    """ids of placement groups not in state REMOVED."""
    actors: list[str] = field(default_factory=list)
    """'ClassName(actor_id)' of sweep actors still ALIVE (or restarting / pending)."""

    def __bool__(self) -> bool:
        return bool(self.placement_groups or self.actors)


STATE_API_TIMEOUT_S = 30
"""Ray's default for one state API request. It is also about how long a request to a dashboard that
is gone takes to fail (Ray retries the connection: 24 s measured), which is what a local cluster's
dashboard is after a terminal's Ctrl-C reached it: the interrupted path asks with a short one."""


def leftovers(timeout_s: float = 30.0, poll_s: float = 1.0, address: str | None = None,
              request_timeout_s: int = STATE_API_TIMEOUT_S) -> Leftovers:
    """Placement groups and sweep actors still alive, after waiting up to `timeout_s` for them to go.

    `address`: the cluster's GCS address; default the one this process is connected to (the state
    API would otherwise auto-detect, and fail when several local clusters run on the machine).
    `request_timeout_s`: of each state API request (an unreachable dashboard raises after it).
    """
    import ray
    from ray.util.state import list_actors, list_placement_groups

    address = address or ray.get_runtime_context().gcs_address

    deadline = time.monotonic() + timeout_s
    while True:
        pgs = list_placement_groups(address=address, filters=[("state", "!=", "REMOVED")], limit=1000,
                                    raise_on_missing_output=False, timeout=request_timeout_s)
        actors = list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=10000,
                             raise_on_missing_output=False, timeout=request_timeout_s)
        found = Leftovers(
            placement_groups=[pg.placement_group_id for pg in pgs],
            actors=[f"{a.class_name}({a.actor_id})" for a in actors
                    if any(name in (a.class_name or "") for name in SWEEP_ACTOR_CLASSES)],
        )
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(poll_s)


def release_job_placement_groups(address: str | None = None, request_timeout_s: int = STATE_API_TIMEOUT_S) -> list[str]:
    """Remove the placement groups this job (the sweep driver's) still holds; returns their ids.

    Called after `tuner.fit()`, when no trial of the sweep runs any more, so every placement group
    of the job is a leak. Ray Train V2 removes the worker group's placement group of a killed
    controller from a detached `PlacementGroupCleaner` that polls the controller through the state
    API without an address; on a machine with several local Ray clusters (and no `ray start`
    address file) that lookup fails and the placement group of each stopped trial stays behind.
    """
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    address = address or ray.get_runtime_context().gcs_address
    job = ray.get_runtime_context().get_job_id()
    removed = []
    for pg in list_placement_groups(address=address, filters=[("state", "!=", "REMOVED")], limit=1000,
                                    raise_on_missing_output=False, detail=True, timeout=request_timeout_s):
        if pg.creator_job_id != job:
            continue
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg.placement_group_id)))
            removed.append(pg.placement_group_id)
        except Exception as exc:  # removed meanwhile
            log.debug("could not remove placement group %s: %s", pg.placement_group_id, exc)
    return removed
