"""Connect to Ray the way a job expects: the cluster it was submitted to, or a local one.

Under `ray job submit` (which sets RAY_ADDRESS), or with RAY_ADDRESS set by hand (e.g.
`RAY_ADDRESS=127.0.0.1:6379` beside `cluster/start_head.sh`, or `auto`), jobs join that
cluster. Otherwise a private single-node cluster starts in-process with the node IP 127.0.0.1:
every port it opens listens on loopback only — GCS, raylet, object manager, workers, dashboard,
agents, metrics, and also the two servers Ray and torch would bind to all interfaces whatever the
node IP (a Serve replica's gRPC server, the torch rendezvous store of a training run; see
`loopback_worker_setup`). tests/test_ray_env.py lists them. Token authentication is on (Ray's
default for a new local cluster) and the token file is readable by its owner only. (Joining
"whatever cluster runs on this machine" implicitly would attach to another program's in-process
cluster, which can vanish under the job.)
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import ray

log = logging.getLogger("mythos")

# Ray replaces a node IP of 127.0.0.1 with the machine's outward address
# (ray._private.services.resolve_ip_for_localhost) unless it believes multi-node clusters are off,
# which this variable says (meant for Windows/macOS; on Linux "0" only keeps 127.0.0.1). With the
# outward address the gRPC servers bind all interfaces, with 127.0.0.1 they bind loopback.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While a local cluster starts, keep its node IP 127.0.0.1 so that all of its ports listen on
    loopback. Ray reads the variable when imported (this process) and in every process it spawns
    (GCS, raylet, dashboard, agents; workers inherit the raylet's environment), so both are set."""
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before_env


# -- in every worker of the private cluster (runtime_env worker_process_setup_hook) -------------------


def loopback_worker_setup() -> None:
    """Bind to loopback the two servers a worker of a loopback-only cluster opens on all interfaces
    whatever the node IP: Ray Serve's replica gRPC server (hard-coded "[::]:0" in Ray 2.60), when the
    worker's node IP is loopback, and the torch.distributed rendezvous store on rank 0 of a process
    group whose MASTER_ADDR is loopback (torch binds ::/0.0.0.0; Ray Train passes rank 0's node IP).
    Cheap: torch is patched when a worker imports it, never imported here. Ray runs this in every
    worker of the job (runtime_env worker_process_setup_hook, set by init_ray)."""
    from ray._common import tls_utils

    add_port = tls_utils.add_port_to_grpc_server
    if not getattr(add_port, "_mythos_loopback", False):

        def add_port_to_grpc_server(server, address):
            host, _, port = str(address).rpartition(":")
            if host in ("[::]", "0.0.0.0", "") and _node_ip() in LOOPBACK_HOSTS:
                address = f"127.0.0.1:{port}"
            return add_port(server, address)

        add_port_to_grpc_server._mythos_loopback = True
        tls_utils.add_port_to_grpc_server = add_port_to_grpc_server
    if "torch.distributed.rendezvous" in sys.modules:
        _patch_rendezvous(sys.modules["torch.distributed.rendezvous"])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport("torch.distributed.rendezvous", _patch_rendezvous))


def _node_ip() -> str | None:
    try:
        return ray._private.worker.global_worker.node_ip_address
    except Exception:  # noqa: BLE001 - not connected
        return None


def _patch_rendezvous(rendezvous) -> None:
    create = rendezvous._create_c10d_store
    if getattr(create, "_mythos_loopback", False):
        return

    def _create_c10d_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or not port or hostname not in LOOPBACK_HOSTS or rendezvous._torchelastic_use_agent_store():
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        # the master store takes a socket already listening on loopback instead of binding ::
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        from torch.distributed import TCPStore

        # as torch's own (multi_tenant: a later store on this port in this process reuses the server)
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, use_libuv=use_libuv, master_listen_fd=sock.detach())

    _create_c10d_store._mythos_loopback = True
    rendezvous._create_c10d_store = _create_c10d_store


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Run patch(module) right after `name` is first imported (once)."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            try:
                patch(module)
            except Exception:  # noqa: BLE001 - never break torch's import over a binding detail
                log.warning("could not bind the torch rendezvous store to loopback", exc_info=True)

        spec.loader.exec_module = exec_and_patch
        return spec


def worker_setup() -> None:
    """What every worker of a job started by `init_ray` runs first (runtime_env
    worker_process_setup_hook): `loopback_worker_setup`, and RAY_ADDRESS pinned to the worker's own
    cluster. Ray's state API (which Ray Train's placement-group cleaner and Tune call without an
    address) otherwise looks for a cluster on the machine and fails with "Found multiple active Ray
    instances" when another one runs there (a second job, a test run beside a demo), and the
    placement groups of stopped runs then stay behind, holding their CPUs."""
    loopback_worker_setup()
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


WORKER_SETUP_HOOK = f"{__name__}.worker_setup"


def is_loopback_address(address: str) -> bool:
    """A GCS address (host:port) on this machine's loopback; not `auto`, not a `ray://` client address."""
    if "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK_HOSTS


# -- the auth token -------------------------------------------------------------------------------------


def token_path() -> Path:
    """Where Ray reads the auth token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def secure_token_file(create: bool = False) -> Path | None:
    """Make the Ray auth token file readable by its owner only (Ray writes it with the umask, usually
    0644). create=True first writes a new token there with mode 0600 when none exists (what Ray
    would do for a new local cluster, with the umask's mode). Nothing to do when auth is off
    (RAY_AUTH_MODE other than token) or the token comes from RAY_AUTH_TOKEN. Returns the file or None."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = token_path()
    if create and not path.exists() and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        import secrets

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process wrote it meanwhile
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
        log.info("made the Ray auth token %s readable by its owner only", path)
    return path


def init_ray(num_cpus: int | None = None, working_dir: str | None = None, quiet: bool = True) -> None:
    """Idempotent: only quiets Ray Data when Ray is already initialised in this process (a Tune
    trial or a Ray task that drives its own training run)."""
    import ray.data

    if ray.is_initialized():
        # a pipeline created in this process takes this process's DataContext; a streaming split's
        # progress bars would otherwise keep printing from a trial's coordinator after the trial
        ray.data.DataContext.get_current().enable_progress_bars = False
        return
    address = os.environ.get("RAY_ADDRESS")
    runtime_env = {"working_dir": working_dir} if working_dir else {}
    if address:
        secure_token_file()
        if is_loopback_address(address):  # e.g. cluster/start_head.sh's head
            runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
        # loopback_node: an address of 127.0.0.1 stays 127.0.0.1 (Ray would dial the outward address,
        # where a loopback-only head such as cluster/start_head.sh's does not listen); other hosts
        # are used as given either way
        with loopback_node():
            ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=True)
    else:
        secure_token_file(create=True)
        runtime_env["worker_process_setup_hook"] = WORKER_SETUP_HOOK
        # address="local": a new cluster even when `ray start` left one on this machine (which Ray
        # joins for address=None); the dashboard serves the state API that Ray Train/Tune use to
        # clean up placement groups
        with loopback_node():
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
                     dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=True,
                     configure_logging=not quiet)
    ray.data.DataContext.get_current().enable_progress_bars = False
