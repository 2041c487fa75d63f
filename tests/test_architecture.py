"""DESIGN §3 import rules: the core imports neither torch nor simpy; sim/ never imports torch;
exec/ never imports simpy."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import aptmoe

ROOT = Path(__file__).resolve().parents[1]
CORE = Path(aptmoe.__file__).resolve().parent
BACKENDS = ("sim", "exec", "calibration")          # installed as aptmoe.sim, aptmoe.exec, aptmoe.calibration


def core_modules() -> list[str]:
    out = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if parts and parts[0] in BACKENDS:
            continue
        out.append(".".join(["aptmoe", *parts]))
    return out


def imported_roots(source: str) -> set[str]:
    """Top-level package names a module imports: import statements anywhere (functions and
    TYPE_CHECKING blocks included) and __import__ / importlib.import_module with a literal name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if fname in ("__import__", "import_module"):
                names.add(node.args[0].value.split(".")[0])
    return names


def test_core_module_list_is_complete() -> None:
    mods = core_modules()
    for must in ("aptmoe.config", "aptmoe.flags", "aptmoe.memory", "aptmoe.policy", "aptmoe.trace",
                 "aptmoe.plan.actions", "aptmoe.plan.plan", "aptmoe.plan.builders", "aptmoe.plan.validate",
                 "aptmoe.plan.partition", "aptmoe.affinity", "aptmoe.analytic_cost", "aptmoe.popularity",
                 "aptmoe.profile"):
        assert must in mods
    assert not any(m.startswith(("aptmoe.sim", "aptmoe.exec", "aptmoe.calibration")) for m in mods)


def test_core_imports_neither_torch_nor_simpy() -> None:
    mods = core_modules()
    code = ("import importlib, json, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in ('torch', 'simpy') if k in sys.modules)))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("folder, forbidden", [("sim", "torch"), ("exec", "simpy"),
                                               ("aptmoe", "torch"), ("aptmoe", "simpy")])
def test_source_does_not_import(folder: str, forbidden: str) -> None:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no sources under {folder}/"
    offenders = [str(p.relative_to(ROOT)) for p in files if forbidden in imported_roots(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("source, found", [
    ("import torch", {"torch"}),
    ("import torch.nn.functional as F", {"torch"}),
    ("from torch.cuda import Event", {"torch"}),
    ("def f():\n    import simpy\n", {"simpy"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n", {"typing", "torch"}),
    ("import importlib\nimportlib.import_module('simpy.resources')", {"importlib", "simpy"}),
    ("t = __import__('torch')", {"torch"}),
    ("from . import torch_free", set()),
    ("x = 'import torch'", set()),
])
def test_import_detector(source: str, found: set[str]) -> None:
    assert imported_roots(source) == found
