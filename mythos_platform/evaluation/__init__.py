"""Accuracy versus inference loops: lm-eval tasks scored at several loop counts, on Ray.

    res = run_loop_eval(LoopEvalConfig(model="runs/debug/export/debug", loops=[1, 2, 4, 8, 16],
                                       tasks=["multihop"], exit_thresholds=[0.01, 0.05]))
    print(res.table_md)

One Ray task per loop setting (all its tasks in one lm-eval run; per exit threshold too, for the
adaptive exit), each asking for `cpus_per_task` CPUs (fractions are fine: 0.5 fits four at once on
2 CPUs); results stream back as they finish. The driver logs into one MLflow run (experiment
"mythos-eval"): every metric as `<task>/<metric>` at step = n_loops, the adaptive exit as
`<task>/<metric>/exit_<threshold>` and `<task>/mean_loops/exit_<threshold>` at step = the loop
cap, a plot `results/accuracy_vs_loops.png`, and the tables `results/results.md`,
`results/results.csv` (one row per point) and `results/results.json`.

The model is resolved once on the driver (a models:/ URI is downloaded into the run folder)
and the workers load that folder: on a multi-node cluster `run_root` must be shared storage,
as for Ray Train's storage_path.

Modules: `config` (LoopEvalConfig, the job's section), `points` (EvalPoint and the Ray task body),
`report` (tables, CSV, plot, metric names), `runner` (the fan-out). The lm-eval side (the model
adapter, the task catalog, the task data readers) is `evals`, which knows nothing of the platform.
"""

from .config import LoopEvalConfig
from .points import EvalPoint, evaluate_points
from .runner import LoopEvalResult, plan_settings, run_loop_eval

__all__ = ["EvalPoint", "LoopEvalConfig", "LoopEvalResult", "evaluate_points", "plan_settings", "run_loop_eval"]
