"""Package edges go one way: the runtime never imports the profile package (which measures with
the runtime), the policy core imports neither, trace and shapes sit below all of them, and the
policy core's messages never name a command-line flag (the CLI words flags itself)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hybrimoe"

FORBIDDEN = {  # package or module -> what it must not import
    "runtime": ("hybrimoe.profile", "hybrimoe.run", "hybrimoe.cli", "hybrimoe.tune"),
    "policy": ("torch", "hybrimoe.runtime", "hybrimoe.profile", "hybrimoe.run", "hybrimoe.cli", "hybrimoe.tune"),
    "trace": ("torch", "hybrimoe.runtime", "hybrimoe.profile", "hybrimoe.policy", "hybrimoe.run", "hybrimoe.cli"),
    "shapes.py": ("hybrimoe.runtime", "hybrimoe.profile", "hybrimoe.policy", "hybrimoe.trace", "hybrimoe.run"),
    "serve": ("hybrimoe.cli", "hybrimoe.profile", "hybrimoe.tune"),
}

# module -> what it may import despite its package's rule, and why
ALLOWED = {
    "trace/sglang.py": ("torch",),  # SGLang's dumps are torch.save files; read lazily, by `trace import` only
}


def _sources(part: str) -> list[Path]:
    path = PACKAGE / part
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def _imports(source: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_go_one_way(part):
    for source in _sources(part):
        for name in _imports(source):
            allowed = ALLOWED.get(str(source.relative_to(PACKAGE)), ())
            bad = [f for f in FORBIDDEN[part] if (name == f or name.startswith(f + ".")) and f not in allowed]
            assert not bad, f"{source.relative_to(PACKAGE)} imports {name}"


def test_policy_errors_never_name_a_flag():
    for source in _sources("policy"):
        for raised in (n for n in ast.walk(ast.parse(source.read_text())) if isinstance(n, ast.Raise)):
            for node in ast.walk(raised):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert "--" not in node.value, f"{source.name}: {node.value!r}"
