"""The command line's sub-commands, one module each: argument parsing and printing, nothing else.

Each module has `register(subparsers, parents)`, which adds its parser with the shared flag groups
(`parents`: "model" and "fca", from `common`) and sets `func` to the function that runs it. The jobs
themselves are library functions (`minifca.evaluate`, `minifca.ablate`, `minifca.bench`, ...), which
never import this package.
"""
from __future__ import annotations

from . import ablate, bench, calibrate, demo, distill, embed, evaluate, explain, run
from .common import fca_parent, model_parent

MODULES = (run, embed, demo, explain, evaluate, ablate, calibrate, distill, bench)   # in the order `minifca --help` lists them


def register_all(subparsers):
    parents = {"model": model_parent(), "fca": fca_parent()}
    for module in MODULES:
        module.register(subparsers, parents)
