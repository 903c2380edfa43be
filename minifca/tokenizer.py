"""Tokenization through the `tokenizers` library: tokenizer.json, or vocab.txt (+ tokenizer_config.json)."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, TokenizerError


@dataclass
class Encoding:
    """A padded batch: int64 arrays [B, L]; attention_mask is 1 on real tokens, 0 on padding."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    tokens: list | None = None  # the token strings of each sequence, without padding

    def __len__(self):
        return self.input_ids.shape[0]

    def __getitem__(self, idx):
        """A sub-batch (slice or index array), trimmed to its own longest sequence."""
        idx = np.arange(len(self))[idx] if not isinstance(idx, slice) else idx
        ids, mask, tt = self.input_ids[idx], self.attention_mask[idx], self.token_type_ids[idx]
        L = max(int(mask.sum(1).max()), 1) if len(ids) else 1
        toks = None if self.tokens is None else list(np.array(self.tokens, dtype=object)[idx])
        return Encoding(ids[:, :L], mask[:, :L], tt[:, :L], toks)


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; encodes single sentences or pairs into an Encoding.

    Safe to call from several threads at once: truncation is a setting of the wrapped `tokenizers`
    object, switched on and off around each call that asks for it, so every use of that object holds
    `_lock` (`_encode`). Without it a concurrent call saw another's setting (4 threads: 461 of 1,200
    calls had texts cut to another call's limit). One lock, not a copy of the tokenizer per limit: a
    copy costs as much as loading it again (80 ms for MiniLM's), which a first output would pay.
    """

    def __init__(self, tk, max_positions: int, pad_id: int = 0):
        self._tk = tk
        self.max_positions = max_positions
        self.pad_id = pad_id
        self._lock = threading.Lock()
        self._tk.no_padding()
        self._tk.no_truncation()

    def _encode(self, items, limit: int | None):
        """encode_batch with truncation to `limit` tokens (None: none), the setting kept to this call."""
        with self._lock:
            if limit is None:
                return self._tk.encode_batch(items)
            self._tk.enable_truncation(limit, strategy="longest_first")
            try:
                return self._tk.encode_batch(items)
            finally:
                self._tk.no_truncation()

    @classmethod
    def from_folder(cls, folder: Path, max_positions: int, pad_id: int = 0) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        tj, vocab = folder / "tokenizer.json", folder / "vocab.txt"
        if tj.is_file():
            try:
                tk = HFTokenizer.from_file(str(tj))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
                raise TokenizerError(f"{tj}: cannot be read by tokenizers ({e})") from None
            return cls(tk, max_positions, pad_id)
        if vocab.is_file():
            from tokenizers.implementations import BertWordPieceTokenizer
            lower = True
            tc = folder / "tokenizer_config.json"
            if tc.is_file():
                try:
                    d = json.loads(tc.read_bytes().decode("utf-8"))
                except OSError as e:
                    raise TokenizerError(f"{tc}: cannot read ({e.strerror or e})") from None
                except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
                    raise TokenizerError(f"{tc}: not valid JSON, or not UTF-8 ({type(e).__name__}: {e})") from None
                if not isinstance(d, dict):
                    raise TokenizerError(f"{tc}: expected a JSON object, got {type(d).__name__}")
                lower = d.get("do_lower_case", True)
                if not isinstance(lower, bool):
                    raise TokenizerError(f"{tc}: field 'do_lower_case' must be true or false, got {lower!r}")
            try:
                wp = BertWordPieceTokenizer(str(vocab), lowercase=lower)
            except Exception as e:  # noqa: BLE001 (reported, not raised)
                raise TokenizerError(f"{vocab}: cannot be read as a WordPiece vocabulary ({e})") from None
            return cls(wp._tokenizer, max_positions, pad_id)
        raise TokenizerError(f"{folder}: no tokenizer.json or vocab.txt found")

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    def id_to_token(self, i: int) -> str:
        return self._tk.id_to_token(int(i)) or f"<{i}>"

    def __call__(self, texts, pairs=None, max_length: int | None = None, truncation: bool | None = None) -> Encoding:
        """Encode `texts` (a str or list of str), optionally with `pairs`, padded to the longest.

        Longer than max_length (default: max_position_embeddings) is an InputError unless
        truncation is asked for (`truncation=True`, or giving `max_length` implies it).
        """
        return self.pad(self.encode(texts, pairs, max_length, truncation))

    def encode(self, texts, pairs=None, max_length: int | None = None, truncation: bool | None = None) -> list:
        """The unpadded encodings (`tokenizers.Encoding`: .ids, .type_ids, .tokens) of each text (pair),
        checked as `__call__` checks them. `pad` turns any selection of them into a batch."""
        texts = _strings("texts", texts)
        if pairs is not None:
            pairs = _strings("pairs", pairs)
            if len(pairs) != len(texts):
                raise InputError(f"{len(texts)} texts but {len(pairs)} pairs: give one second sentence per text")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))):
            raise InputError(f"max_length must be an integer (tokens) or None, got {max_length!r}")
        if truncation is not None and not isinstance(truncation, (bool, np.bool_)):
            raise InputError(f"truncation must be True, False or None, got {truncation!r}")
        if truncation is None:
            truncation = max_length is not None
        limit = self.max_positions if max_length is None else int(max_length)
        if not 2 <= limit <= self.max_positions:
            raise InputError(f"max_length must be in [2, {self.max_positions}] (max_position_embeddings), got {limit}")
        try:
            batch = self._encode(list(zip(texts, pairs)) if pairs is not None else texts, limit if truncation else None)
        except Exception as e:  # noqa: BLE001 - tokenizers raises TypeError/ValueError/its own on text it cannot encode
            raise InputError(_unencodable(texts, pairs, e)) from None
        lengths = [len(e.ids) for e in batch]
        too_long = [i for i, n in enumerate(lengths) if n > limit]
        if too_long:
            i = too_long[0]
            raise InputError(f"input {i} has {lengths[i]} tokens, more than the limit {limit} "
                             f"(max_position_embeddings or max_length); pass truncation=True (Python) or --max-length N (command line) to cut it")
        return batch

    def pad(self, batch: list, tokens: bool = True) -> Encoding:
        """A list of `encode`'s encodings as one batch padded to its longest (tokens: keep the token strings)."""
        L = max(len(e.ids) for e in batch)
        B = len(batch)
        ids = np.full((B, L), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.int64)
        tt = np.zeros((B, L), dtype=np.int64)
        for b, e in enumerate(batch):
            n = len(e.ids)
            ids[b, :n], mask[b, :n], tt[b, :n] = e.ids, 1, e.type_ids
        return Encoding(ids, mask, tt, [list(e.tokens) for e in batch] if tokens else None)


def _strings(name, texts) -> list:
    """`texts` as a non-empty list of str (one str is a list of one); InputError naming `name` otherwise."""
    if isinstance(texts, str):
        return [texts]
    if texts is None or isinstance(texts, (bytes, bytearray, dict)) or not hasattr(texts, "__iter__"):
        raise InputError(f"{name} must be a string or a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise InputError("empty input: give at least one text" if name == "texts" else f"{name} is empty")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise InputError(f"{name} must be strings: {name}[{bad}] is {type(texts[bad]).__name__} {texts[bad]!r:.40}")
    return texts


def _unencodable(texts, pairs, e) -> str:
    """The message for a batch `tokenizers` refused: which text, and why (a lone surrogate, most often)."""
    for name, seq in (("texts", texts), ("pairs", pairs or [])):
        for i, t in enumerate(seq):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as u:
                return (f"{name}[{i}] cannot be encoded as UTF-8 (character {t[u.start]!r} at {u.start}: a lone "
                        f"surrogate; decode your bytes with errors='replace' or fix the text)")
    return f"the tokenizer cannot encode the input ({type(e).__name__}: {' '.join(str(e).split())})"
