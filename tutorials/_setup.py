"""What every tutorial needs: where the shared assets are, fast mode, where outputs go.

The shared folder (the SST-2 fine-tune and data) sits beside the repository
(`../shared`), or wherever the environment variable MINIFCA_SHARED points.
MINIFCA_TUTORIAL_FAST=1 (set by `build.py --fast`, as the tests run it) asks for small samples.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("MINIFCA_SHARED", ROOT.parent / "shared"))
SST2_MODEL = SHARED / "models" / "minilm-l6-sst2"
SST2_DEV = SHARED / "data" / "sst2" / "dev.tsv"
FAST = os.environ.get("MINIFCA_TUTORIAL_FAST", "0") not in ("0", "", "false", "False")
OUT = Path(os.environ.get("MINIFCA_TUTORIAL_OUT", HERE))


def read_sst2(path=SST2_DEV, limit=None):
    """(sentences, labels) of a GLUE SST-2 TSV (header `sentence<TAB>label`), the first `limit` rows."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if line.strip()][:limit]
    return [s.strip() for s, _ in rows], np.array([int(y) for _, y in rows])
