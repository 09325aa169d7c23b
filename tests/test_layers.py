"""Package layers, enforced by import-linter (`[tool.importlinter]` in pyproject.toml):

    jobs -> mythos_platform -> evals -> mythos      (each may import only those to its right)
    mythos imports neither ray nor torch.distributed

The real `lint-imports` passes on the repository and fails, naming the broken contract and the
import, on a copy with violating imports. import-linter cannot forbid a submodule of an external
package (torch.distributed), so that half of the second rule is checked here on the source.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "mythos_platform", "evals", "mythos")
LAYERS = "layers: jobs -> mythos_platform -> evals -> mythos"
NO_RAY = "mythos does not import ray"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports not found: install the dev extra (pip install -c constraints.txt -e '.[dev]')")
    return subprocess.run([found, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_repository_keeps_its_layers():
    out = lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert f"{LAYERS} KEPT" in out.stdout and f"{NO_RAY} KEPT" in out.stdout
    assert "0 broken" in out.stdout


def test_the_contracts_fail_on_violating_imports(tmp_path):
    skip = shutil.ignore_patterns("__pycache__", "data", "*.jsonl", "*.png", "*.yaml")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    assert lint_imports(tmp_path).returncode == 0  # the copy itself is clean
    # the lm-eval adapter reaching up into the platform, and the model importing Ray (lazily, too)
    with (tmp_path / "evals/catalog.py").open("a") as f:
        f.write("\nfrom mythos_platform.tracking import Tracker  # violation\n")
    with (tmp_path / "mythos/generation.py").open("a") as f:
        f.write("\n\ndef _violation():\n    import ray  # noqa\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert f"{LAYERS} BROKEN" in out.stdout and f"{NO_RAY} BROKEN" in out.stdout
    assert "evals.catalog -> mythos_platform.tracking" in out.stdout and "mythos.generation -> ray" in out.stdout


def distributed_uses(source: str) -> list[int]:
    """Lines of `source` that import or reach torch.distributed (docstrings and comments do not count)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            hit = any(a.name == "torch.distributed" or a.name.startswith("torch.distributed.") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            hit = mod == "torch.distributed" or mod.startswith("torch.distributed.") or (
                mod == "torch" and any(a.name == "distributed" for a in node.names))
        else:
            hit = isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch"
        if hit:
            lines.append(node.lineno)
    return lines


def test_model_package_never_touches_torch_distributed():
    offenders = {str(p.relative_to(ROOT)): distributed_uses(p.read_text()) for p in (ROOT / "mythos").rglob("*.py")}
    assert {p: lines for p, lines in offenders.items() if lines} == {}
    # the check bites: every spelling is found, mentions in text are not
    bad = ("import torch.distributed as dist\nfrom torch.distributed import fsdp\nfrom torch import distributed\n"
           "import torch\nok = torch.distributed.is_initialized()\n")
    assert distributed_uses(bad) == [1, 2, 3, 5]
    assert distributed_uses('"""no torch.distributed here"""\n# nor torch.distributed.init_process_group\n') == []
