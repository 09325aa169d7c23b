"""The code's shape: short functions, and no test-only parameters in the platform's API."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
CHECKED = ("mythos_platform", "jobs")
TEST_ONLY_PARAMS = {"fault"}


def _functions(package: str):
    """(path relative to the repo, qualified name, node) of every function and method."""
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        stack = [(node, "") for node in tree.body]
        while stack:
            node, prefix = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{node.name}"
                if not isinstance(node, ast.ClassDef):
                    yield path.relative_to(ROOT), name, node
                stack.extend((child, f"{name}.") for child in node.body)
            elif hasattr(node, "body"):  # functions under if / try / with
                stack.extend((child, prefix) for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def _is_public(qualname: str) -> bool:
    return not any(part.startswith("_") and not part.startswith("__") for part in qualname.split("."))


def test_no_function_is_longer_than_60_lines():
    long = [f"{path}:{name}:{node.end_lineno - node.lineno + 1}"
            for package in CHECKED for path, name, node in _functions(package)
            if node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines (file:function:lines):\n" + "\n".join(long)


def test_no_public_function_takes_a_test_only_parameter():
    bad = []
    for path, name, node in _functions("mythos_platform"):
        a = node.args
        params = {p.arg for p in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if p is not None}
        if _is_public(name) and params & TEST_ONLY_PARAMS:
            bad.append(f"{path}:{name}({', '.join(sorted(params & TEST_ONLY_PARAMS))})")
    assert not bad, "public functions with a test-only parameter (inject faults from the test side):\n" + "\n".join(bad)
