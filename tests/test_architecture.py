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
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "broken" in r.stdout and " 0 broken" in r.stdout


def test_no_import_by_name_string():
    """importlib.import_module / __import__ would hide an import from the layers check."""
    hidden = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "minifca").rglob("*.py"))
              for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
              if re.search(r"\bimport_module\(|__import__\(", line)]
    assert not hidden, hidden


def test_every_backend_provides_exactly_the_ops_contract():
    """kernels.OPS (written out in kernels/__init__.py): each backend has every op, with those arguments."""
    import inspect

    from minifca import grad, kernels, reference
    from minifca.kernels import cpu, cuda
    for backend, drop_self in ((reference, False), (cpu, False), (cuda.CudaOps, True), (grad.Tape, True)):
        for op, args in kernels.OPS.items():
            fn = getattr(backend, op, None)
            assert callable(fn), f"{backend.__name__} has no {op}"
            params = list(inspect.signature(fn).parameters)[1 if drop_self else 0:]
            assert tuple(params) == args, f"{backend.__name__}.{op}{tuple(params)}: the contract says {args}"


def test_the_one_layer_loop_calls_only_the_contract():
    """reference.bert_forward is the loop every backend runs: what it (and FCA through `reduce`) asks of
    `ops` is the contract, no more and no less; no backend (training's Tape included) has a forward of its own."""
    import ast
    import inspect

    from minifca import grad, kernels, reference
    from minifca.kernels import cpu, cuda
    tree = ast.parse(inspect.getsource(reference.bert_forward))
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "ops"}
    assert used | {"reduce_batch"} == set(kernels.OPS), used           # reduce_batch: what each `reduce` uses
    assert not any(hasattr(b, "bert_forward") for b in (cpu, cuda.CudaOps, grad.Tape))


def test_no_layer_loop_outside_the_reference():
    """No loop over the layers in the package runs a layer forward (attention, ffn or their training
    twins) except reference.bert_forward's: the training forward (grad.forward) runs that one too.
    Loops that only walk the weights (packing, uploading, saving) or the backward's reversed walk pass."""
    import ast
    import inspect

    from minifca import reference
    forward_ops = {"attention", "attention_forward", "ffn", "ffn_forward", "layer_forward"}
    loops = []                                                       # (file, line) of each layer-forward loop
    for path in sorted((ROOT / "minifca").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for loop in (n for n in ast.walk(tree) if isinstance(n, ast.For) and "layers" in ast.unparse(n.iter)):
            called = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", None)
                      for c in ast.walk(loop) if isinstance(c, ast.Call)}
            if called & forward_ops:
                loops.append((str(path.relative_to(ROOT)), loop.lineno))
    lines, first = inspect.getsourcelines(reference.bert_forward)
    assert [f for f, _ in loops] == ["minifca/reference.py"], loops
    assert first <= loops[0][1] < first + len(lines), loops          # and it is bert_forward's


def test_activation_names_are_the_references():
    """config accepts the activations the reference defines; the kernels' codes cover every one."""
    from minifca import config, reference
    from minifca.kernels import cpu, cuda
    assert set(config.ACTIVATIONS) == set(reference.ACTIVATIONS) == set(cpu.ACT_CODES) == set(cuda.ACT_CODES)


def test_ruff_finds_nothing():
    """`ruff check minifca tests` with ruff's default rules (pyproject.toml sets only the line length and
    how imports are grouped) is clean."""
    exe = Path(sys.executable).with_name("ruff")
    assert exe.is_file(), f"ruff missing at {exe} (pip install -e '.[test]')"
    r = subprocess.run([str(exe), "check", "--no-cache", "minifca", "tests"], check=False, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
