import os

import pytest
import torch

import ports

# two cores: keep intra-op threads at 2 in all (`make test` runs two pytest workers, one thread
# each: more threads than cores makes OpenMP spin) and make every test deterministic
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 2) // WORKERS))

SLOW_FIRST = ("test_interrupts.py", "test_ray_env.py", "test_expert_parallel.py", "test_sweep.py",
              "test_pretrain.py", "test_depth.py", "test_evals.py", "test_data.py", "test_serve.py")
"""Modules that take a minute or more, in the order `make test` hands them out: pytest-xdist's
--dist loadfile gives each of the two workers a module, and another as soon as fewer than 3 of its
tests are left (a worker must know its next test to run the current one), so the module queued
behind the 8-to-12-minute interrupt chain (one test) waits for it. This order balances the two
workers' minutes as measured in a clean-clone run (about 1,000 s each, from 1,970 s of tests in
all). The Makefile passes --no-loadscope-reorder, without which xdist orders modules by test count
instead (and the one-test interrupt chain started last)."""


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a TCP port free on 127.0.0.1 right now (for a server's http.port;
    `tests/ports.py` says why not the kernel's choice)."""
    return ports.free_port


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module: 2 CPUs, listening on 127.0.0.1 only (as the jobs'
    private cluster, mythos_platform.ray_env), a new one even if a head runs on this machine,
    dashboard on (Ray Train and Tune use its state API to clean up placement groups), shut down
    after the module."""
    import ray
    import ray.data

    from mythos_platform import ray_env

    with ray_env.loopback_node():
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=False, object_store_memory=400 * 1024**2,
                 configure_logging=False, runtime_env={"worker_process_setup_hook": ray_env.WORKER_SETUP_HOOK})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve never started in this module
        pass
    ray.shutdown()


@pytest.fixture
def one_rank_group(free_port):
    """A gloo process group of one rank in this process (FSDP2 and DDP paths without Ray)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
