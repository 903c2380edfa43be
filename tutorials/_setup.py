"""What every tutorial needs: where the shared assets are, fast mode, where outputs go.

The shared folder (the SST-2 fine-tune and data) sits beside the repository
(`../shared`), or wherever the environment variable MINIFCA_SHARED points.
MINIFCA_TUTORIAL_FAST=1 (set by `build.py --fast`, as the tests run it) asks for small samples.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minifca.assets import shared_path
from minifca.data import load_data

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = shared_path()
SST2_MODEL, SST2_DEV = shared_path("sst2_model"), shared_path("sst2_dev")
FAST = os.environ.get("MINIFCA_TUTORIAL_FAST", "0") not in ("0", "", "false", "False")
OUT = Path(os.environ.get("MINIFCA_TUTORIAL_OUT", HERE))


def read_sst2(path=SST2_DEV, limit=None):
    """(sentences, labels) of a GLUE SST-2 TSV (header `sentence<TAB>label`), the first `limit` rows."""
    data = load_data(path, limit=limit)
    return data.texts, np.array(data.labels)
