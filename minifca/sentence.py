"""sentence-transformers checkpoints: what their files say about turning token vectors into one sentence vector.

    modules.json                  [Transformer (""), Pooling ("1_Pooling"), Normalize ("2_Normalize")]
    sentence_bert_config.json     {"max_seq_length": 256, "do_lower_case": false}
    1_Pooling/config.json         {"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false, ...}

`Model.embed` follows them as sentence-transformers' `encode` does: truncate to `max_seq_length`, pool
(mean of the valid units, or the [CLS] unit), and L2-normalise when a Normalize module is listed.
A folder without modules.json is embedded as minifca always did: mean pooling, no normalisation, the
model's full length. A module or pooling mode minifca does not implement is recorded here and refused,
by name, when `embed` is called (forward and classify do not use these files).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import reference
from .errors import ConfigError

POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}  # the modes implemented


@dataclass(frozen=True)
class SentenceConfig:
    pooling: str = "mean"              # "mean" (each unit weighted by the tokens it holds) or "cls"
    normalize: bool = False            # a Normalize module: unit-length embeddings
    max_seq_length: int | None = None  # longer inputs are truncated to this many tokens
    do_lower_case: bool = False        # lower-case texts before tokenizing
    unsupported: tuple = ()            # what embed() refuses, each naming its file and module or mode

    @classmethod
    def from_folder(cls, folder) -> SentenceConfig:
        folder = Path(folder)
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            return cls()
        kw, unsupported = {}, []
        for m in _read(modules_file, list):
            kind = str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else ""
            sub = folder / str(m.get("path", "")) if isinstance(m, dict) else folder
            if kind == "Transformer":
                if sub.resolve() != folder.resolve():
                    unsupported.append(f"{modules_file}: the Transformer module lives in {sub.name}/, "
                                       "not in the folder minifca loaded")
                st = sub / "sentence_bert_config.json"
                if st.is_file():
                    d = _read(st, dict)
                    if d.get("max_seq_length") is not None:
                        kw["max_seq_length"] = _positive_int(d["max_seq_length"], st, "max_seq_length")
                    kw["do_lower_case"] = bool(d.get("do_lower_case", False))
            elif kind == "Pooling":
                modes = [k for k, v in _read(sub / "config.json", dict).items()
                         if k.startswith("pooling_mode_") and v is True]
                if len(modes) == 1 and modes[0] in POOLING_MODES:
                    kw["pooling"] = POOLING_MODES[modes[0]]
                else:
                    unsupported.append(f"{sub / 'config.json'}: pooling {' + '.join(modes) or '(none set)'}; "
                                       f"minifca implements exactly one of {', '.join(POOLING_MODES)}")
            elif kind == "Normalize":
                kw["normalize"] = True
            else:
                unsupported.append(f"{modules_file}: module {m.get('type') if isinstance(m, dict) else m!r} "
                                   "is not implemented by minifca (it knows Transformer, Pooling, Normalize)")
        return cls(**kw, unsupported=tuple(unsupported))

    def check(self):
        """Raise a ConfigError naming what this checkpoint asks for that embed() cannot do."""
        if self.unsupported:
            raise ConfigError("cannot embed as this sentence-transformers checkpoint says: "
                              + "; ".join(self.unsupported))


def pool(x, mask, sizes, pooling="mean"):
    """One vector per sequence from the final units [B, n, H] -> [B, H]."""
    if pooling == "cls":
        return x[:, 0]                                               # [B, n, H] -> [B, H]: [CLS] is always unit 0
    return reference.mean_pool(x, mask, sizes)                       # [B, H]


def l2_normalize(emb):
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), np.float32(1e-12))  # [..., H]


def _read(path, kind):
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: listed by modules.json but missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, kind):
        raise ConfigError(f"{path}: expected a JSON {'list' if kind is list else 'object'}, got {type(d).__name__}")
    return d


def _positive_int(v, path, field):
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ConfigError(f"{path}: {field} must be an integer >= 2, got {v!r}")
    return v
