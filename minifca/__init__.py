"""minifca: BERT inference in NumPy (+ Numba, + numba.cuda) and FCA token reduction.

    import minifca
    model = minifca.from_pretrained("path/to/checkpoint")          # config.json + model.safetensors
    enc = model.tokenize(["a fine film .", "a dull one ."])
    out = model(enc)                                                # plain BERT
    out = model(enc, fca=minifca.FCAConfig(keep=0.5))               # FCA: half the tokens kept
"""
from . import _process

_process.configure()  # OpenBLAS's idle threads and glibc's malloc thresholds, before NumPy loads: see _process.py

from .assets import default_model_path
from .config import BertConfig
from .errors import BackendError, CheckpointError, ConfigError, InputError, MinifcaError, TokenizerError
from .fca import AGGREGATES, SCORES, FCAConfig, register_aggregate, register_score
from .model import Model, Output, from_pretrained
from .tokenizer import Encoding

__version__ = "0.1.0"
__all__ = ["AGGREGATES", "SCORES", "BackendError", "BertConfig", "CheckpointError", "ConfigError", "Encoding",
           "FCAConfig", "InputError", "MinifcaError", "Model", "Output", "TokenizerError", "default_model_path",
           "from_pretrained", "register_aggregate", "register_score"]
