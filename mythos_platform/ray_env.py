"""Connect to Ray the way a job expects: the cluster it was submitted to, or a local one.

Under `ray job submit` (which sets RAY_ADDRESS), or with RAY_ADDRESS set by hand (e.g.
`RAY_ADDRESS=127.0.0.1:6379` beside `cluster/start_head.sh`, or `auto`), jobs join that
cluster. Otherwise a private single-node cluster starts in-process, bound to 127.0.0.1 so no
port listens beyond loopback. (Joining "whatever cluster runs on this machine" implicitly
would attach to another program's in-process cluster, which can vanish under the job.)
"""

from __future__ import annotations

import logging
import os

# Every progress line is its own: two training runs side by side print similar lines, which Ray's
# log deduplication would fold into "[repeated Nx across cluster]". Ray reads this when imported.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
import ray.data  # noqa: E402

log = logging.getLogger("mythos")


def init_ray(num_cpus: int | None = None, working_dir: str | None = None, quiet: bool = True) -> None:
    """Idempotent: only quiets Ray Data when Ray is already initialised in this process (a Tune
    trial or a Ray task that drives its own training run)."""
    if ray.is_initialized():
        # a pipeline created in this process takes this process's DataContext; a streaming split's
        # progress bars would otherwise keep printing from a trial's coordinator after the trial
        ray.data.DataContext.get_current().enable_progress_bars = False
        return
    runtime_env = {"working_dir": working_dir} if working_dir else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # the dashboard serves the state API that Ray Train/Tune use to clean up placement groups
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=not quiet)
    ray.data.DataContext.get_current().enable_progress_bars = False
