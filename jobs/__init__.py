"""Job entry points, the top layer of the project: scripts run as files, locally or under Ray.

    python jobs/pretrain.py --config jobs/configs/debug.yaml
    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/evaluate-debug.yaml

Each script puts the repository root on sys.path itself and is never imported as `jobs.<name>` by
the project. This file makes the folder a package only so that import-linter can check it: jobs
may import `mythos_platform`, `evals` and `mythos`; nothing imports jobs (pyproject.toml,
[tool.importlinter]).
"""
