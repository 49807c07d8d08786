"""The package's shape: imports only go down the layers, drawing stays in report, modules stay small.

Every module under ``src/genxai`` is read with ``ast`` (nothing is imported or run); each of its
``genxai`` imports (``import``, ``from ... import``, relative, at top level or inside functions,
and ``importlib.import_module("genxai....")``) must go to a lower tier of ``TIERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "genxai"

TIERS: tuple[tuple[str, ...], ...] = (
    ("genxai",),  # the root __init__: __version__ only
    ("core",),
    ("config", "targets"),  # targets: the public alias of core.targets
    ("data", "models", "training"),
    ("attribution", "evaluation"),
    ("diffusion", "dissection", "explainers", "gan"),
    ("report", "jobs"),
    ("cli",),
    ("__main__",),  # genxai/__main__.py, if any: the only importer of genxai.cli besides cli itself
)
"""Lowest first. A package may import the packages of lower tiers, never of its own or a higher one."""

SAME_TIER: dict[str, set[str]] = {
    "training": {"data"},  # the generic loop iterates the data packages' batches
    "jobs": {"report"},  # jobs lay their results out with report; report never runs a job
}
"""The exceptions: packages that may also import these packages of their own tier."""

ONLY: dict[str, set[str]] = {
    "core": set(),
    "training": {"genxai", "core", "config", "data"},
}
"""Packages held to less than their tier allows: they may import only these."""

OWNERS: dict[str, set[str]] = {"matplotlib": {"report"}}
"""Third-party packages only these genxai packages may import (diffusion computes, report draws)."""

MAX_LINES = 600

TIER_OF = {unit: i for i, tier in enumerate(TIERS) for unit in tier}


def _name(unit: str) -> str:
    return unit if unit == "genxai" else f"genxai.{unit}"


def _unit(module: list[str]) -> str:
    """``["genxai", "diffusion", "unet"]`` -> ``"diffusion"``; the root package is ``"genxai"``."""
    return module[1] if len(module) > 1 else "genxai"


def _imported(node: ast.AST, package: list[str], units: set[str]) -> list[str]:
    """The dotted modules an import node (or an ``import_module("...")`` call) brings in."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            keep = len(package) - (node.level - 1)
            if keep < 1:
                return ["<relative import beyond genxai>"]
            base = ".".join(package[:keep] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base == "genxai":  # `from genxai import diffusion` imports genxai.diffusion
            return [f"genxai.{a.name}" if a.name in units else "genxai" for a in node.names]
        return [base]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
        in ("import_module", "__import__")
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def _rule(src: str, dst: str) -> str | None:
    """Why ``genxai.<src>`` may not import ``genxai.<dst>``; ``None`` when it may."""
    for unit in (src, dst):
        if unit not in TIER_OF:
            return f"{_name(unit)} is not in the layer table TIERS of tests/test_architecture.py: place it"
    if src in ONLY:
        if dst in ONLY[src]:
            return None
        if not ONLY[src]:
            return f"{_name(src)} may import nothing of genxai (ONLY)"
        return f"{_name(src)} may import only {', '.join(map(_name, sorted(ONLY[src], key=TIER_OF.__getitem__)))} (ONLY)"
    if TIER_OF[dst] < TIER_OF[src] or dst in SAME_TIER.get(src, set()):
        return None
    where = "the same tier as" if TIER_OF[dst] == TIER_OF[src] else "a higher tier than"
    return (
        f"{_name(dst)} is in {where} {_name(src)} (TIERS[{TIER_OF[dst]}] vs TIERS[{TIER_OF[src]}]); "
        "imports go down the tiers only"
    )


def layer_violations(package_dir: Path) -> list[str]:
    """Every import under ``package_dir`` (a ``genxai`` folder) that breaks the layering, as
    ``path:line: `import ...`: rule`` lines."""
    package_dir = Path(package_dir)
    files = sorted(package_dir.rglob("*.py"))
    units = {p.name if p.is_dir() else p.stem for p in package_dir.iterdir() if not p.name.startswith(".")}
    found = []
    for file in files:
        parts = ["genxai", *file.relative_to(package_dir).with_suffix("").parts]
        package = parts[:-1]  # what a relative import starts from (for __init__: the package itself)
        module = parts if parts[-1] != "__init__" else parts[:-1]
        src = "__main__" if module == ["genxai", "__main__"] else _unit(module)
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            for name in _imported(node, package, units):
                top = name.split(".")[0]
                if name.startswith("<"):
                    rule = name[1:-1]
                elif top == "genxai":
                    dst = _unit(name.split("."))
                    rule = None if dst == src else _rule(src, dst)
                elif top in OWNERS and src not in OWNERS[top]:
                    rule = f"only {', '.join(map(_name, sorted(OWNERS[top])))} may import {top} (OWNERS)"
                else:
                    rule = None
                if rule is not None:
                    where = file.relative_to(package_dir.parent)
                    found.append((str(where), node.lineno, f"`{ast.unparse(node)}`: {rule}"))
    return [f"{where}:{line}: {text}" for where, line, text in sorted(found)]


def test_imports_go_down_the_layers():
    violations = layer_violations(SRC)
    assert not violations, "upward imports:\n" + "\n".join(violations)


def test_the_checker_catches_upward_imports(tmp_path):
    root = tmp_path / "genxai"
    files = {
        "__init__.py": '__version__ = "0"\n',
        "core/__init__.py": "",
        "core/hooks.py": "import torch\n\n\ndef f():\n    from genxai.diffusion import unet\n",
        "targets.py": "from genxai.core import hooks\n",
        "evaluation/__init__.py": "from .fid import FID\n",
        "evaluation/fid.py": "from genxai.attribution.base import Attribution\nFID = 1\n",
        "attribution/__init__.py": "",
        "attribution/base.py": "from ..core.hooks import f\nfrom .. import targets\n",
        "training/loop.py": "from genxai.data import shapes\nimport genxai.models.classifier\n",
        "data/shapes.py": "",
        "models/classifier.py": "",
        "diffusion/__init__.py": "from . import unet\n",
        "diffusion/unet.py": "from .. import report\nimport importlib\nimportlib.import_module('genxai.cli')\n",
        "diffusion/ablation.py": "from genxai.evaluation import fid\nfrom matplotlib.figure import Figure\n",
        "report/plots.py": "import matplotlib\nfrom genxai.diffusion import ablation\n",
        "jobs/run.py": "from genxai.report import plots\nfrom genxai import cli\n",
        "cli/__init__.py": "from genxai.jobs import run\n",
        "cli/__main__.py": "from genxai.cli import app\n",
        "newpkg/x.py": "from genxai.core import hooks\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = layer_violations(root)
    expected = [
        "genxai/core/hooks.py:5: `from genxai.diffusion import unet`: genxai.core may import nothing",
        "genxai/diffusion/ablation.py:2: `from matplotlib.figure import Figure`: only genxai.report may import",
        "genxai/diffusion/unet.py:1: `from .. import report`: genxai.report is in a higher tier than genxai.diffusion",
        "genxai/diffusion/unet.py:3: `importlib.import_module('genxai.cli')`: genxai.cli is in a higher tier",
        "genxai/evaluation/fid.py:1: `from genxai.attribution.base import Attribution`: genxai.attribution is "
        "in the same tier as genxai.evaluation",
        "genxai/jobs/run.py:2: `from genxai import cli`: genxai.cli is in a higher tier",
        "genxai/newpkg/x.py:1: `from genxai.core import hooks`: genxai.newpkg is not in the layer table",
        "genxai/training/loop.py:2: `import genxai.models.classifier`: genxai.training may import only "
        "genxai, genxai.core, genxai.config, genxai.data (ONLY)",
    ]
    assert len(found) == len(expected), "\n".join(found)
    for line, start in zip(found, expected):
        assert line.startswith(start), (line, start)
    # and a tree without them passes
    for name in ("core/hooks.py", "diffusion/unet.py", "diffusion/ablation.py", "evaluation/fid.py"):
        (root / name).write_text("import torch\n")
    for name in ("jobs/run.py", "training/loop.py"):
        (root / name).write_text(files[name].splitlines()[0] + "\n")
    (root / "newpkg" / "x.py").unlink()
    (root / "newpkg").rmdir()
    assert layer_violations(root) == []


def test_no_module_is_over_600_lines():
    sizes = {p.relative_to(SRC.parent): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    long = {str(p): n for p, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
