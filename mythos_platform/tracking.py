"""MLflow tracking that never stops training.

    tracker = Tracker(cfg.tracking, cfg.run.root)            # experiment per job kind
    with tracker.start(run_name="debug", tags=git_tags()):    # FINISHED, or FAILED on an exception
        tracker.log_params(cfg.flatten())
        tracker.log_metrics({"train/loss": 2.3}, step=10)
        tracker.log_figure_file(loss_curve_png(history, "loss.png"))

Where runs go: `MLFLOW_TRACKING_URI` if set, else `tracking.tracking_uri`, else an embedded
SQLite store `sqlite:///<run_root>/mlflow.db`. Experiments of any SQLite store keep their
artifacts beside the database, in `<store dir>/mlartifacts/<experiment>` (`mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db` shows them); a tracking server keeps its own.
Experiments are tagged as model training, so MLflow's UI opens them on the runs and charts.

Failure policy: every MLflow call is wrapped; an exception (server down, bad URI, disk
full) is logged once as a warning through `logging` and the call returns quietly, so a
tracking outage never kills a training run. How long one call may block on an
unreachable server is MLflow's own setting (MLFLOW_HTTP_REQUEST_TIMEOUT,
MLFLOW_HTTP_REQUEST_MAX_RETRIES). If the run cannot even be created, every later call
is a no-op.

Ray workers: the tracker is picklable (the client is rebuilt lazily) and `active=False`
turns every call into a no-op, so `Tracker(cfg, root, run_id=driver_run_id,
active=(rank == 0))` inside a worker logs into the driver's run from rank 0 only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from mythos_platform.config import TrackingConfig, flatten_dict
from mythos_platform.figures import new_figure, save_figure, style_axes

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment by its kind: without this tag it guesses the GenAI view (an
empty traces page); model training opens the runs table with the metric charts."""

# MLflow's limits (mlflow.utils.validation): values longer than these are rejected.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_TAG_VALUE = 8000
BATCH = 100

__all__ = ["Tracker", "tracking_uri", "artifact_location", "git_commit", "git_tags", "loss_curve_png",
           "flatten_params"]


def tracking_uri(cfg: TrackingConfig, run_root: str | os.PathLike) -> str:
    """MLFLOW_TRACKING_URI > cfg.tracking_uri > sqlite:///<abs run_root>/mlflow.db."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{Path(run_root).expanduser().resolve() / 'mlflow.db'}"


def artifact_location(store_uri: str, experiment: str) -> str | None:
    """For a local SQLite store (`sqlite:///<dir>/mlflow.db`): the file:// URI of
    `<dir>/mlartifacts/<experiment>`, so that artifacts live beside the database whichever job or
    working directory creates the experiment; None (the server's default) for other stores.
    Without it MLflow puts a new experiment's artifacts under `./mlruns` of the current directory."""
    if not store_uri.startswith("sqlite:///"):
        return None
    db = Path(store_uri.removeprefix("sqlite:///").split("?")[0])
    db = db if db.is_absolute() else Path.cwd() / db
    return (db.expanduser().resolve().parent / "mlartifacts" / experiment).as_uri()


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[{len(text) - limit + 20} chars cut]"
    return text[: limit - len(marker)] + marker


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested dict -> dotted keys with string values inside MLflow's key/value length limits."""
    out = {}
    for k, v in flatten_dict(dict(params)).items():
        text = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
        out[_truncate(str(k), MAX_KEY)] = _truncate(text, MAX_PARAM_VALUE)
    return out


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """HEAD's commit hash of the repository at `path`, with '-dirty' when it has local changes; None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not sha:
        return None
    return f"{sha}-dirty" if dirty else sha


def git_tags(path: str | os.PathLike = ".") -> dict[str, str]:
    """{'mlflow.source.git.commit': sha} (MLflow's own tag name), or {} outside git."""
    sha = git_commit(path)
    return {"mlflow.source.git.commit": sha} if sha else {}


def loss_curve_png(history: Mapping[str, Sequence[tuple[int, float]]] | Sequence[Mapping[str, float]],
                   path: str | os.PathLike, title: str = "loss", log_y: bool = False) -> Path:
    """Plot series to a PNG and return its path.

    `history`: {name: [(step, value), ...]}, or rows [{"step": s, "train/loss": v, ...}, ...].
    Uses the non-interactive Agg backend (no display needed).
    """
    series: dict[str, list[tuple[int, float]]] = {}
    if isinstance(history, Mapping):
        series = {k: list(v) for k, v in history.items()}
    else:
        for row in history:
            for k, v in row.items():
                if k != "step" and v is not None:
                    series.setdefault(k, []).append((row["step"], float(v)))
    fig, ax = new_figure()
    for name, points in sorted(series.items()):
        pts = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=name)
    if log_y:
        ax.set_yscale("log")
    style_axes(ax, xlabel="step", title=title)
    return save_figure(fig, path)


class Tracker:
    """One MLflow run; every method swallows MLflow errors (warned once) so training goes on."""

    def __init__(self, cfg: TrackingConfig, run_root: str | os.PathLike, *, run_id: str | None = None,
                 active: bool = True) -> None:
        self.cfg = cfg
        self.run_root = str(run_root)
        self.uri = tracking_uri(cfg, run_root)
        self.run_id = run_id
        self.active = active and cfg.enabled
        self._client: MlflowClient | None = None
        self._warned = False
        self.errors = 0

    # --- plumbing ---------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None  # rebuilt where it is used (e.g. inside a Ray worker)
        return state

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _fail(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking at %s failed (%s: %s: %s); training goes on without it "
                        "(further tracking errors are logged at DEBUG)", self.uri, what, type(exc).__name__, first)
        else:
            log.debug("MLflow %s failed: %s: %s", what, type(exc).__name__, first)

    def _live(self) -> bool:
        return self.active and self.run_id is not None

    def _call(self, what: str, send: Callable[["MlflowClient"], T], default: T | None = None, *,
              needs_run: bool = True) -> T | None:
        """`send(client)` when the run is live (or, with needs_run=False, when the tracker is active);
        else `default`. An MLflow error is counted, warned once, and answered with `default`."""
        if not (self._live() if needs_run else self.active):
            return default
        try:
            return send(self.client)
        except Exception as exc:
            self._fail(what, exc)
            return default

    def _log_batch(self, client: "MlflowClient", size: int = BATCH, **rows: list) -> None:
        """`client.log_batch` of one kind of rows (params=, metrics= or tags=) in slices of `size`."""
        ((kind, items),) = rows.items()
        for i in range(0, len(items), size):
            client.log_batch(self.run_id, **{kind: items[i: i + size]})

    # --- runs -------------------------------------------------------------------------
    def create_experiment(self) -> str | None:
        """Create the store and the experiment now (None when inactive). Runs started at once by
        several processes would otherwise race to migrate a new SQLite store."""
        return self._experiment_id() if self.active else None

    def _experiment_id(self) -> str:
        """The experiment's id, created if needed, tagged as model training (`EXPERIMENT_KIND`)."""
        name = self.cfg.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older version, or by hand
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri, name),
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def search_runs(self, filter_string: str, *, max_results: int = 1000, newest_first: bool = False) -> list:
        """Runs of the experiment `cfg.experiment` matching `filter_string` (MLflow's search syntax, e.g.
        "tags.`mythos.run_name` = 'debug'"); [] when inactive, when the experiment does not exist yet,
        or when the store cannot be read (counted and warned like every MLflow error)."""
        def send(client: "MlflowClient") -> list:
            exp = client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                return []
            order = ["attributes.start_time DESC"] if newest_first else None
            return list(client.search_runs([exp.experiment_id], filter_string, order_by=order,
                                           max_results=max_results))
        return self._call("search runs", send, [], needs_run=False)

    def find_run(self, filter_string: str) -> str | None:
        """The id of the newest run matching `filter_string` (e.g. an earlier launch's run, to
        continue it with `reopen`), or None (see `search_runs`)."""
        runs = self.search_runs(filter_string, max_results=1, newest_first=True)
        return runs[0].info.run_id if runs else None

    def start(self, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> "Tracker":
        """Create the run (in the experiment `cfg.experiment`); a no-op if inactive or already started."""
        if not self.active or self.run_id is not None:
            return self
        try:
            run = self.client.create_run(self._experiment_id(), run_name=run_name or self.cfg.run_name,
                                         tags={k: _truncate(str(v), MAX_TAG_VALUE) for k, v in (tags or {}).items()})
            self.run_id = run.info.run_id
        except Exception as exc:
            self._fail("start run", exc)
        return self

    def reopen(self, run_id: str) -> "Tracker":
        """Continue the existing run `run_id` (e.g. from `find_run`), marked RUNNING again; a no-op if inactive."""
        if self.active:
            self.run_id = run_id
            self._call("reopen run", lambda c: c.update_run(run_id, status="RUNNING"))
        return self

    def status(self) -> str | None:
        """This run's MLflow status (RUNNING, FINISHED, KILLED, FAILED); None when inactive or unknown."""
        return self._call("read the run's status", lambda c: c.get_run(self.run_id).info.status)

    def tag(self, key: str) -> str | None:
        """The value of this run's tag `key`; None when unset, inactive or unknown."""
        return self._call("read a tag", lambda c: c.get_run(self.run_id).data.tags.get(key))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED."""
        self._call("end run", lambda c: c.set_terminated(self.run_id, status=status))

    def __enter__(self) -> "Tracker":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    # --- logging ----------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested or flat dict; flattened to dotted keys, values stringified and truncated to MLflow's limits."""
        def send(client: "MlflowClient") -> None:
            from mlflow.entities import Param

            self._log_batch(client, params=[Param(k, v) for k, v in flatten_params(params).items()])
        self._call("log_params", send)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Numeric values at `step` (non-numeric ones are skipped)."""
        def send(client: "MlflowClient") -> None:
            import time

            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            items = []
            for k, v in metrics.items():
                try:
                    items.append(Metric(_truncate(k, MAX_KEY), float(v), ts, int(step)))
                except (TypeError, ValueError):
                    log.debug("metric %s=%r is not a number; skipped", k, v)
            self._log_batch(client, BATCH * 10, metrics=items)
        self._call("log_metrics", send)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        def send(client: "MlflowClient") -> None:
            from mlflow.entities import RunTag

            self._log_batch(client, tags=[RunTag(_truncate(k, MAX_KEY), _truncate(str(v), MAX_TAG_VALUE))
                                          for k, v in tags.items()])
        self._call("set_tags", send)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file or a whole folder (`log_artifacts`) under `artifact_path` of the run."""
        def send(client: "MlflowClient") -> None:
            upload = client.log_artifacts if Path(path).is_dir() else client.log_artifact
            upload(self.run_id, str(path), artifact_path)
        self._call("log_artifact", send)

    def log_dict(self, data: Mapping[str, Any] | list, artifact_file: str) -> None:
        """JSON (or YAML, by the extension of `artifact_file`) artifact."""
        self._call("log_dict", lambda c: c.log_dict(self.run_id, data, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", lambda c: c.log_text(self.run_id, text, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib Figure saved as `artifact_file` (e.g. 'plots/loss.png')."""
        self._call("log_figure", lambda c: c.log_figure(self.run_id, figure, artifact_file))

    def log_loss_curve(self, history: Any, artifact_file: str = "plots/loss.png", **kw: Any) -> None:
        """`loss_curve_png(history)` rendered to a temporary file and logged as `artifact_file`."""
        if not self._live():
            return
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            png = loss_curve_png(history, Path(tmp, Path(artifact_file).name), **kw)
            self.log_artifact(png, str(Path(artifact_file).parent) if Path(artifact_file).parent.name else None)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a logged metric, read back from the store ([] when unavailable)."""
        return self._call("metric_history",
                          lambda c: [(m.step, m.value) for m in c.get_metric_history(self.run_id, key)], [])
