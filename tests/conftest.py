import os

import pytest
import torch

# two cores: keep intra-op threads at 2 and make every test deterministic
torch.set_num_threads(min(2, os.cpu_count() or 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module: 2 CPUs, bound to 127.0.0.1, dashboard on (Ray Train
    and Tune use its state API to clean up placement groups), shut down after the module."""
    import ray
    import ray.data

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, object_store_memory=400 * 1024**2, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve never started in this module
        pass
    ray.shutdown()
