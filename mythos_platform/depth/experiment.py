"""The depth-extrapolation experiment: an RDT and a parameter-matched baseline, trained side
by side as Ray tasks on problems with hops <= N, evaluated on hops 1..2N; results to MLflow."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from mythos import Mythos, MythosConfig
from mythos.checkpoint import save_pretrained

from ..ray_env import init_ray
from ..tracking import Tracker, git_tags
from .config import DepthConfig
from .train import shallow_floor, train_and_evaluate


@dataclass
class DepthResult:
    grid: dict[tuple[int, int], float]
    """RDT accuracy per (hops, loops)."""
    baseline: dict[int, float]
    """Baseline accuracy per hops."""
    floor: dict[int, float]
    """Per hops: the best accuracy of a fixed answer f^j(start), j < hops and j <= N (train.shallow_floor)."""
    table_md: str
    plot_path: Path
    run_id: str | None
    tracking_uri: str
    seconds: float
    params: dict[str, int]


def _grid(raw: dict[str, float]) -> dict[tuple[int, int], float]:
    return {tuple(int(x) for x in k.split(",")): v for k, v in raw.items()}  # type: ignore[misc]


def results_table(cfg: DepthConfig, grid, baseline, floor) -> tuple[str, str]:
    """(markdown, csv): one row per hop count, one column per RDT loop count, the RDT run at as many
    loops as the problem has hop marks, then the baseline."""
    loops = sorted({n for _, n in grid})
    head = ["hops", *[f"RDT {n} loops" for n in loops], "RDT loops = hops", "baseline", "shallow floor"]
    rows = []
    for h in range(1, cfg.eval_max_hops + 1):
        trained = "*" if h <= cfg.train_max_hops else ""
        rows.append([f"{h}{trained}", *[f"{grid[(h, n)]:.2f}" for n in loops], f"{grid[(h, h)]:.2f}",
                     f"{baseline[h]:.2f}" if baseline else "-", f"{floor[h]:.2f}"])
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    md += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    md += f"\n`*` hop counts seen in training (1..{cfg.train_max_hops}); chance = 1/{cfg.n_symbols} = " \
          f"{1 / cfg.n_symbols:.3f}; shallow floor = the best accuracy of answering f^j(start) for one fixed " \
          f"j < hops, j <= {cfg.train_max_hops} (what a model that stops short scores, through cycles).\n"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(head)
    for r in rows:
        writer.writerow([r[0].rstrip("*"), *r[1:]])
    return md, buf.getvalue()


def plot(cfg: DepthConfig, grid, baseline, floor, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = list(range(1, cfg.eval_max_hops + 1))
    loops = sorted({n for _, n in grid})
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(loops):
        ax.plot(hops, [grid[(h, n)] for h in hops], marker="o", color=cmap(i / max(1, len(loops) - 1)),
                label=f"RDT, {n} loops")
    ax.plot(hops, [grid[(h, h)] for h in hops], color="crimson", linewidth=2.5, marker="D",
            label="RDT, loops = hops")
    if baseline:
        ax.plot(hops, [baseline[h] for h in hops], "k--", marker="s", label="baseline (no loop, same params)")
    ax.plot(hops, [floor[h] for h in hops], ":", color="grey",
            label=f"shallow floor (best f^j, j <= {cfg.train_max_hops})")
    ax.axvspan(0.5, cfg.train_max_hops + 0.5, color="0.92", zorder=0, label="trained hop counts")
    ax.set_xlabel("hops")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Depth extrapolation: trained on <= {cfg.train_max_hops} hops\n({cfg.schedule} schedule, "
                 f"{cfg.supervision} loss, {cfg.steps} steps)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _export(result: dict[str, Any], folder: Path) -> Path:
    model = Mythos(MythosConfig.from_dict(result["model_config"]))
    model.load_state_dict(result["state_dict"])
    return save_pretrained(model, folder, metadata={"experiment": "depth", "model": result["name"]})


def run_depth_experiment(cfg: DepthConfig) -> DepthResult:
    t0 = time.perf_counter()
    root = Path(cfg.run.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    init_ray()
    task = ray.remote(num_cpus=cfg.threads_per_model)(train_and_evaluate)
    refs = [task.remote(cfg.to_dict(), True)]
    if cfg.baseline:
        refs.append(task.remote(cfg.to_dict(), False))
    print(f"[mythos depth] training {'the RDT and the baseline' if cfg.baseline else 'the RDT'} "
          f"({cfg.steps} steps, hops <= {cfg.train_max_hops}, {cfg.schedule} schedule, {cfg.supervision} loss)",
          flush=True)
    results = ray.get(refs)
    rdt = results[0]
    base = results[1] if cfg.baseline else None
    grid = _grid(rdt["grid"])
    baseline = {h: a for (h, _), a in _grid(base["grid"]).items()} if base else {}
    floor = shallow_floor(cfg)
    md, csv_text = results_table(cfg, grid, baseline, floor)
    plot_path = plot(cfg, grid, baseline, floor, root / "depth_extrapolation.png")
    (root / "depth_extrapolation.md").write_text(md)
    (root / "depth_extrapolation.csv").write_text(csv_text)

    tracker = Tracker(cfg.tracking, root)
    tracker.start(run_name=cfg.run.name, tags={"mythos.job": "depth", **git_tags(Path(__file__).resolve().parents[2])})
    tracker.log_params(cfg.to_dict())
    params = {r["name"]: r["params"] for r in results}
    tracker.log_metrics({f"params_{k}": v for k, v in params.items()}, step=0)
    for (h, n), acc in grid.items():
        tracker.log_metrics({f"rdt_acc_hops_{h}": acc}, step=n)
    for h, acc in baseline.items():
        tracker.log_metrics({f"baseline_acc_hops_{h}": acc}, step=1)
    for r in results:
        for rec in r["history"]:
            tracker.log_metrics({f"{r['name']}_loss": rec["loss"], f"{r['name']}_train_acc": rec["train_acc"]},
                                step=rec["step"])
        for step, top in [(0, 1 if cfg.curriculum_steps > 0 else cfg.train_max_hops), *r["curriculum"]]:
            tracker.log_metrics({f"{r['name']}_max_train_hops": top}, step=step)
        tracker.log_metrics({f"{r['name']}_train_seconds": r["train_seconds"]}, step=cfg.steps)
        tracker.log_artifact(str(_export(r, root / "models" / r["name"])), artifact_path=f"models/{r['name']}")
    tracker.log_artifact(str(plot_path), artifact_path="plots")
    tracker.log_text(md, "results/depth_extrapolation.md")
    tracker.log_text(csv_text, "results/depth_extrapolation.csv")
    tracker.end()
    seconds = time.perf_counter() - t0
    return DepthResult(grid, baseline, floor, md, plot_path, tracker.run_id, tracker.uri, seconds, params)
