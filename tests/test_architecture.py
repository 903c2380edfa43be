"""The package's shape: its import layers (pyproject.toml's import-linter contracts) hold, and every
import is one a static tool can see."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_import_layers_hold():
    """`lint-imports`: the layers contract (function-level imports included) and the benchmarks-only rule
    for torch/transformers/onnxruntime, on this checkout's package."""
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.is_file(), f"lint-imports missing at {exe} (pip install -e '.[test]')"
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and " 0 broken" in r.stdout


def test_no_import_by_name_string():
    """importlib.import_module / __import__ would hide an import from the layers check."""
    hidden = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "minifca").rglob("*.py"))
              for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
              if re.search(r"\bimport_module\(|__import__\(", line)]
    assert not hidden, hidden
