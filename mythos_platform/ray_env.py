"""Connect to Ray the way a job expects: the cluster it was submitted to, or a local one.

Under `ray job submit` (RAY_ADDRESS is set) or beside a running `ray start --head`, jobs
join that cluster. Otherwise a local single-node cluster starts in-process, bound to
127.0.0.1 so no port listens beyond loopback.
"""

from __future__ import annotations

import logging
import os

import ray
import ray.data

log = logging.getLogger("mythos")


def init_ray(num_cpus: int | None = None, working_dir: str | None = None, quiet: bool = True) -> None:
    """Idempotent: does nothing when Ray is already initialised in this process."""
    if ray.is_initialized():
        return
    runtime_env = {"working_dir": working_dir} if working_dir else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    try:  # a head started with cluster/start_head.sh on this machine
        ray.init(address="auto", runtime_env=runtime_env, log_to_driver=True)
        log.info("joined the running Ray cluster")
        return
    except (ConnectionError, RuntimeError, ValueError):
        pass
    # the dashboard serves the state API that Ray Train/Tune use to clean up placement groups
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             runtime_env=runtime_env, log_to_driver=True, configure_logging=not quiet)
    ray.data.DataContext.get_current().enable_progress_bars = False
