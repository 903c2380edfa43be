"""BertConfig: the fields of a Hugging Face `config.json` that BERT inference uses, validated."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    num_labels: int = 2
    id2label: dict = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    architectures: tuple = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["architectures"] = list(self.architectures)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> BertConfig:
        """Validate a config dict the way transformers' BertConfig would read it."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"{source}: model_type is {model_type!r}; minifca runs 'bert' checkpoints only")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ConfigError(f"{source}: position_embedding_type {pet!r} is not supported (only 'absolute')")
        if d.get("is_decoder", False) or d.get("add_cross_attention", False):
            raise ConfigError(f"{source}: is_decoder/add_cross_attention are set; minifca runs BERT encoders only")
        kw = {}
        defaults = cls()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            v = d.get(name, getattr(defaults, name))
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {v!r}")
            kw[name] = v
        pad = d.get("pad_token_id", 0)
        pad = 0 if pad is None else pad
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < kw["vocab_size"]:
            raise ConfigError(f"{source}: field 'pad_token_id' must be an integer in [0, vocab_size), got {pad!r}")
        kw["pad_token_id"] = pad
        act = d.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: field 'hidden_act' is {act!r}; supported: {', '.join(ACTIVATIONS)}")
        kw["hidden_act"] = act
        eps = d.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"{source}: field 'layer_norm_eps' must be a number in (0, 1), got {eps!r}")
        kw["layer_norm_eps"] = float(eps)
        if kw["hidden_size"] % kw["num_attention_heads"]:
            raise ConfigError(f"{source}: hidden_size ({kw['hidden_size']}) is not a multiple of "
                              f"num_attention_heads ({kw['num_attention_heads']})")
        id2label = d.get("id2label")
        num_labels = d.get("num_labels")
        if id2label is not None:
            if not isinstance(id2label, dict) or not id2label:
                raise ConfigError(f"{source}: field 'id2label' must be a non-empty object")
            try:
                id2label = {int(k): v for k, v in id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: field 'id2label' has keys that are not integers") from None
            if not all(isinstance(v, str) for v in id2label.values()):
                raise ConfigError(f"{source}: field 'id2label' must map class numbers to names (strings)")
            if sorted(id2label) != list(range(len(id2label))):
                raise ConfigError(f"{source}: field 'id2label' keys must be 0..{len(id2label) - 1}")
            if num_labels is not None and num_labels != len(id2label):
                raise ConfigError(f"{source}: num_labels is {num_labels} but id2label has {len(id2label)} entries")
            num_labels = len(id2label)
        if num_labels is None:
            num_labels = 2
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ConfigError(f"{source}: field 'num_labels' must be a positive integer, got {num_labels!r}")
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        label2id = d.get("label2id")
        if isinstance(label2id, dict) and label2id and set(label2id) != set(id2label.values()):
            raise ConfigError(f"{source}: label2id {sorted(label2id)} contradicts id2label {sorted(id2label.values())}")
        kw["num_labels"] = num_labels
        kw["id2label"] = id2label
        arch = d.get("architectures") or []
        if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
            raise ConfigError(f"{source}: field 'architectures' must be a list of class names, got {arch!r}")
        kw["architectures"] = tuple(arch)
        return cls(**kw)

    @classmethod
    def from_json(cls, path) -> BertConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found")
        try:
            d = json.loads(path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"{path}: not valid JSON, or not UTF-8 ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, source=str(path))
