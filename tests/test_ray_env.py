"""What the embedded Ray (mythos_platform.ray_env.init_ray) and the local head
(cluster/start_head.sh) expose: every listening socket on loopback, token auth that refuses a
client without the token, an owner-only token file; and cluster/stop_head.sh stops its head only."""

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from mythos_platform import ray_env
from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _non_loopback(rows):
    import ipaddress

    def loopback(ip):
        addr = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(addr, "ipv4_mapped", None)
        return (mapped or addr).is_loopback

    return [r for r in rows if not loopback(r[0])]


# -- the token file (no Ray) -------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_token_file_is_created_owner_only(home):
    path = ray_env.secure_token_file(create=True)
    assert path == home / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text()) == 64 and int(path.read_text(), 16) >= 0


def test_existing_token_file_is_made_owner_only(home):
    path = home / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("t" * 64)
    path.chmod(0o644)
    assert ray_env.secure_token_file() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "t" * 64


def test_no_token_file_when_auth_is_off_or_the_token_is_in_the_environment(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_env.secure_token_file(create=True) is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x" * 64)
    assert ray_env.secure_token_file(create=True) is None
    assert not (home / ".ray").exists()


def test_loopback_node_is_scoped():
    from ray._private import ray_constants

    before = (os.environ.get(ray_env.LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER)
    with ray_env.loopback_node():
        assert os.environ[ray_env.LOOPBACK_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert (os.environ.get(ray_env.LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER) == before


def test_stop_head_never_runs_ray_stop_and_tolerates_no_head(tmp_path):
    text = (ROOT / "cluster" / "stop_head.sh").read_text()
    assert "ray stop" not in "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    env = {**os.environ, "GCS_PORT": str(free_port()), "RAY_TMPDIR": str(tmp_path)}
    (tmp_path / "ray").mkdir()
    out = subprocess.run(["bash", "cluster/stop_head.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "no Ray head" in out.stderr


# -- a real private cluster, as the jobs start it ---------------------------------------------------------

# Starts init_ray, opens what a job opens (a task, the rank-0 torch rendezvous store of a process
# group, a Serve app on 127.0.0.1), then prints RESULT <json>: the listening sockets of every process
# it started, and what a client without the token gets. Then answers "ping" lines until stdin closes.
PRIVATE_RAY = textwrap.dedent('''
    import json, os, socket, sys, urllib.error, urllib.request
    from mythos_platform.ray_env import init_ray, token_path
    import ray
    import psutil  # Ray's bundled copy

    def listening(pids):
        pids = set(pids)
        rows = []
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids:
                try:
                    name = psutil.Process(c.pid).name()
                except psutil.Error:
                    name = "?"
                rows.append((c.laddr.ip, c.laddr.port, name))
        return rows

    init_ray(num_cpus=2)

    @ray.remote
    def process_group_sockets():
        import torch.distributed as dist
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
        try:
            return port, listening([os.getpid()])
        finally:
            dist.destroy_process_group()

    store_port, store_rows = ray.get(process_group_sockets.remote())

    from ray import serve

    @serve.deployment
    class Probe:
        def __call__(self, request):
            return "ok"

    http_port = int(sys.argv[1])
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(Probe.bind(), name="probe", route_prefix="/probe")
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/probe", timeout=30) as r:
        served = r.read().decode()

    me = psutil.Process()
    rows = listening([me.pid] + [p.pid for p in me.children(recursive=True)])

    node = ray._private.worker.global_worker.node
    token = token_path().read_text().strip()

    def dashboard(headers):
        req = urllib.request.Request(f"http://{node.address_info['webui_url']}/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    def gcs(metadata):
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(node.gcs_address))
        try:
            stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=30)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    result = dict(
        node_ip=node.node_ip_address, gcs_address=node.gcs_address, rows=rows, served=served,
        store_port=store_port, store_rows=store_rows,
        token_mode=oct(token_path().stat().st_mode & 0o777),
        dashboard={"none": dashboard({}), "wrong": dashboard({"Authorization": "Bearer " + "0" * 64}),
                   "token": dashboard({"Authorization": f"Bearer {token}"})},
        gcs={"none": gcs(None), "token": gcs([("authorization", f"Bearer {token}")])},
        driver_pid=me.pid, pids=[p.pid for p in me.children(recursive=True)],
        core_pids=[p.pid for p in me.children(recursive=True) if p.name() in ("gcs_server", "raylet")])
    print("RESULT " + json.dumps(result), flush=True)
    for line in sys.stdin:
        print("pong", ray.get(ray.remote(lambda: 1).remote()), flush=True)
    serve.shutdown()
    ray.shutdown()
''')


@pytest.fixture(scope="module")
def isolated_env(tmp_path_factory):
    """The environment of the module's Ray processes: a HOME of its own (so ~/.ray/auth_token), no
    RAY_ADDRESS, no auth or loopback variables of the caller."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS + ("RAY_ADDRESS", ray_env.LOOPBACK_ENV)}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return env


def _start_probe(env, tmp_dir: Path):
    """Run PRIVATE_RAY (init_ray: a private cluster, or the one RAY_ADDRESS names); (process, result)."""
    script = tmp_dir / "probe.py"
    script.write_text(PRIVATE_RAY)
    proc = subprocess.Popen([sys.executable, str(script), str(free_port())], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("RESULT "):
            return proc, json.loads(line[len("RESULT "):])
    _end_probe(proc)
    raise AssertionError("".join(lines)[-4000:])


def _end_probe(proc) -> None:
    if proc.stdin and not proc.stdin.closed:
        proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def private_ray(isolated_env, tmp_path_factory):
    proc, result = _start_probe(isolated_env, tmp_path_factory.mktemp("private_ray"))
    try:
        yield proc, result
    finally:
        _end_probe(proc)


def _ping(proc) -> str:
    proc.stdin.write("ping\n")
    proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith("pong"):
            return line.strip()
    return ""


SECOND_RAY = textwrap.dedent('''
    from mythos_platform.ray_env import init_ray
    import ray

    init_ray(num_cpus=1)

    @ray.remote(num_cpus=0)
    def state_api_without_address():
        from ray.util.state import list_nodes  # what Ray Train's placement-group cleaner calls
        return len(list_nodes())

    print("NODES", ray.get(state_api_without_address.remote()))
''')


@pytest.mark.ray
def test_a_job_beside_another_cluster_finds_its_own(private_ray, isolated_env, tmp_path):
    """With a second private cluster on the machine (the module's probe), a worker's state API call
    without an address reaches its own cluster instead of failing on "multiple active Ray instances"."""
    script = tmp_path / "second.py"
    script.write_text(SECOND_RAY)
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=isolated_env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0 and "NODES 1" in out.stdout, (out.stdout + out.stderr)[-3000:]


@pytest.mark.ray
def test_private_cluster_listens_on_loopback_only(private_ray):
    _, result = private_ray
    rows = result["rows"]
    assert result["node_ip"] == "127.0.0.1" and result["gcs_address"].startswith("127.0.0.1:")
    names = {name for _, _, name in rows}
    # the servers of every kind are there (so the check below is not vacuous) ...
    assert {"gcs_server", "raylet"} <= names, rows
    assert any(n.startswith("ray::ServeReplica") for n in names) and any(n.startswith("ray::ProxyActor") for n in names), rows
    assert any(n.startswith("ray::DashboardAgent") for n in names) and len(rows) >= 12, rows
    # ... and none listens beyond loopback; nor does the torch rendezvous store of a process group
    assert _non_loopback(rows) == [], rows
    assert result["store_port"] in {port for _, port, _ in result["store_rows"]}, result["store_rows"]
    assert _non_loopback(result["store_rows"]) == [], result["store_rows"]
    assert result["served"] == "ok"


@pytest.mark.ray
def test_token_auth_refuses_a_client_without_the_token(private_ray):
    _, result = private_ray
    assert result["dashboard"] == {"none": 401, "wrong": 403, "token": 200}
    assert result["gcs"] == {"none": "UNAUTHENTICATED", "token": "OK"}
    assert result["token_mode"] == "0o600"


def _head_processes(session: str, node_id: str) -> list:
    import psutil

    head = []
    for p in psutil.process_iter(["cmdline"]):
        args = " ".join(p.info["cmdline"] or [])
        if session in args or node_id in args:
            with contextlib.suppress(psutil.Error):
                head += [p] + p.children(recursive=True)
    return head


def _listening(processes) -> list:
    """(ip, port, process name) of every listening TCP socket of these processes."""
    import psutil

    names = {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            names[p.pid] = p.name()
    return [(c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in names]


@pytest.fixture
def ray_tmp():
    """Ray's temp dir for the head: a short path (Unix socket names live there), and the head's
    ray_current_cluster file stays out of /tmp/ray, where other ray.init() calls would find it."""
    path = Path(tempfile.mkdtemp(prefix="mythos-rt", dir="/tmp"))
    (path / "ray").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_head_runs_a_submitted_job_listens_on_loopback_only_and_stop_head_stops_only_it(
        private_ray, isolated_env, ray_tmp, tmp_path):
    """cluster/start_head.sh; `ray job submit` of jobs/pretrain.py to it (the job joins through
    init_ray and trains with a torch process group); the head's listening sockets; then
    cluster/stop_head.sh beside the private cluster of the other fixture, which must survive."""
    import psutil  # Ray's bundled copy (ray is imported by mythos_platform.ray_env)

    proc, result = private_ray
    env = {**isolated_env, "NUM_CPUS": "2", "GCS_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()),
           "AGENT_PORT": str(free_port()), "CLIENT_PORT": str(free_port()), "RAY_TMPDIR": str(ray_tmp)}
    state = ray_tmp / "ray" / f"mythos_head_{os.getuid()}_{env['GCS_PORT']}"
    start = subprocess.run(["bash", "cluster/start_head.sh", "--print-env"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=240)
    head = []
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        client_env = dict(env)
        for line in start.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            client_env[key] = value
        assert client_env[ray_env.LOOPBACK_ENV] == "0" and client_env["RAY_ADDRESS"] == f"127.0.0.1:{env['GCS_PORT']}"
        assert client_env["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{env['DASHBOARD_PORT']}"
        assert client_env["RAY_AUTH_MODE"] == "token"
        recorded = dict(line.split("=", 1) for line in state.read_text().split())
        submit = ["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/pretrain.py",
                  "--config", "jobs/configs/debug.yaml", "--set", "train.steps=6", "--set", "train.warmup_steps=2",
                  "--set", "train.log_every=3", "--set", "train.eval_every=6", "--set", "checkpoint.every_steps=6",
                  "--set", "data.n_docs=600", "--set", "data.seq_len=64", "--set", f"run.root={tmp_path}"]
        out = subprocess.run(submit, cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=400)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-3000:]
        assert "succeeded" in log and "] step     6/6" in log and "[mythos] done." in log
        assert (tmp_path / "export" / "debug" / "model.safetensors").exists() and (tmp_path / "mlflow.db").exists()
        head = _head_processes(recorded["session"], recorded["node_id"])
        head_pids = {p.pid for p in head}
        rows = _listening(head)
        assert head_pids and not head_pids & set(result["pids"])
        assert int(env["GCS_PORT"]) in {port for _, port, _ in rows} and len(rows) >= 8, rows
        assert _non_loopback(rows) == [], rows
    finally:
        stop = subprocess.run(["bash", "cluster/stop_head.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert stop.returncode == 0, stop.stderr
    _, alive = psutil.wait_procs(head, timeout=10)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    assert not state.exists()
    # the other cluster of this user is untouched and still runs tasks
    assert len(result["core_pids"]) == 2
    assert all(psutil.pid_exists(pid) for pid in [result["driver_pid"]] + result["core_pids"])
    assert _ping(proc) == "pong 1"
