"""The exceptions minifca raises. Every message names the file, tensor or field at fault.

    MinifcaError            base class of all of them
    ├── ConfigError         config.json missing, malformed, or contradictory      (also ValueError)
    ├── CheckpointError     weights missing, garbled, pickle-only, wrong names/shapes (also ValueError)
    ├── TokenizerError      tokenizer.json / vocab.txt missing or unreadable       (also ValueError)
    ├── InputError          bad input: empty list, too long, ids outside vocab     (also ValueError)
    ├── BackendError        a backend that cannot run here (e.g. CUDA without a GPU) (also RuntimeError)
    └── ClusterError        --cluster: dask.distributed missing, a bad address, no scheduler or workers (also RuntimeError)
"""


class MinifcaError(Exception):
    """Base class of every error minifca raises on purpose."""


class ConfigError(MinifcaError, ValueError):
    """config.json (or an FCA configuration) is missing, malformed or contradictory."""


class CheckpointError(MinifcaError, ValueError):
    """The weights cannot be used: missing, garbled, pickle-only, unexpected or wrongly shaped."""


class TokenizerError(MinifcaError, ValueError):
    """The tokenizer files are missing or unreadable."""


class InputError(MinifcaError, ValueError):
    """The input cannot be run: empty, too long, or token ids outside the vocabulary."""


class BackendError(MinifcaError, RuntimeError):
    """The requested backend cannot run on this machine."""


class ClusterError(MinifcaError, RuntimeError):
    """A Dask cluster cannot be used: dask.distributed not installed, a bad address, no scheduler or no workers."""
