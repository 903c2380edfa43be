"""minifca: BERT inference in NumPy (+ Numba, + numba.cuda) and FCA token reduction.

    import minifca
    model = minifca.from_pretrained("path/to/checkpoint")          # config.json + model.safetensors
    enc = model.tokenize(["a fine film .", "a dull one ."])
    out = model(enc)                                                # plain BERT
    out = model(enc, fca=minifca.FCAConfig(keep=0.5))               # FCA: half the tokens kept
"""
import os

# OpenBLAS's worker threads spin for 2**28 cycles (~0.1 s) after every product by default, and so take
# the cores from the Numba loops between two products: on 16 cores the numba forward ran 1.8-2.1x
# slower for it (MiniLM 8x128: 147.6 ms at the default, 69.7 ms at 2**12; BENCHMARKS.md). OpenBLAS reads
# this once, when NumPy is first imported: it takes effect when minifca is imported before NumPy (the
# `minifca` command, `minifca bench`'s workers); otherwise set it in the environment yourself.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

from .config import BertConfig  # noqa: E402
from .errors import (BackendError, CheckpointError, ConfigError, InputError, MinifcaError, TokenizerError)
from .fca import AGGREGATES, SCORES, FCAConfig, register_aggregate, register_score
from .model import Model, Output, from_pretrained
from .tokenizer import Encoding
from .assets import default_model_path

__version__ = "0.1.0"
__all__ = ["BertConfig", "FCAConfig", "Model", "Output", "Encoding", "from_pretrained", "default_model_path",
           "SCORES", "AGGREGATES", "register_score", "register_aggregate", "MinifcaError", "ConfigError",
           "CheckpointError", "TokenizerError", "InputError", "BackendError"]
