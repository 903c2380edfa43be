"""The user-facing model: from_pretrained, tokenize, forward (plain or FCA), embed, classify."""
from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from . import reference, threadlimit
from .config import BertConfig
from .errors import CheckpointError, ConfigError, InputError
from .fca import FCAConfig, per_sequence, sequence_seeds
from .flops import head_flops, model_flops
from .progress import progress
from .sentence import SentenceConfig, l2_normalize, pool
from .threadlimit import check_threads
from .tokenizer import Encoding, Tokenizer
from .weights import find_weight_files, load_state, release_pages, to_params

NEEDED_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
                "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                "modules.json", "sentence_bert_config.json", "*/config.json"]  # sentence-transformers' (sentence.py)
BACKENDS = ("numpy", "numba", "cuda")
HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")  # huggingface_hub's rules, in short


@dataclass
class Output:
    """What a forward pass returns. Arrays are [B, n, ...] with n units (n = L without FCA)."""
    last_hidden_state: np.ndarray            # [B, n, H]
    mask: np.ndarray                         # [B, n] 1 = valid unit
    sizes: np.ndarray                        # [B, n] input tokens each unit stands for
    pooler_output: np.ndarray | None = None  # [B, H]
    logits: np.ndarray | None = None         # [B, C] (classifier), [B, L, C] (token classifier), [B, L, V] (MLM)
    hidden_states: list | None = None        # num_layers + 1 arrays [B, n_l, H]
    attentions: list | None = None           # num_layers arrays [B, h, n_l, n_l]
    trace: list | None = None                # per layer, per sequence: [{kind, tokens, weights}]
    units: list | None = None                # per layer unit counts (FCA only)
    why_no_logits: str | None = None         # set when the checkpoint has a head but this forward has no logits
    _counter: object = field(default=None, repr=False, compare=False)  # () -> the FLOPs below, run when first read

    @property
    def embeddings(self) -> np.ndarray:
        """Mean-pooled sentence embeddings [B, H] (each unit weighted by its size)."""
        return reference.mean_pool(self.last_hidden_state, self.mask, self.sizes)

    @property
    def flops(self) -> int:                  # this forward, valid units only
        return self._flops["flops"]

    @property
    def flops_full(self) -> int:             # the full model, unpadded
        return self._flops["flops_full"]

    @property
    def flops_full_padded(self) -> int:      # the full model at padded length (pad_to, or the batch's L)
        return self._flops["flops_full_padded"]

    @property
    def flops_per_sequence(self) -> np.ndarray | None:  # [B]
        return self._flops["flops_per_sequence"]

    @cached_property
    def _flops(self) -> dict:
        """The counts (flops.py), made once on first read: a forward whose FLOPs nobody reads (embed, classify, a
        bench loop) spends no time on them."""
        if self._counter is None:
            return {"flops": 0, "flops_full": 0, "flops_full_padded": 0, "flops_per_sequence": None}
        return self._counter()


def _count_flops(cfg, heads, n_tokens, units, padded_to):
    """A forward's FLOPs (Output's flops fields) from its valid tokens [B] and FCA's unit counts; heads: does
    the checkpoint have a pooler, a classifier, a token classifier."""
    head = head_flops(cfg, heads[0], heads[1])
    if heads[2]:                                                     # 2 H C per token
        head = head + 2 * cfg.hidden_size * cfg.num_labels * n_tokens.astype(np.int64)
    per_seq = model_flops(cfg, n_tokens, units, head)
    padded_len = np.maximum(n_tokens, padded_to)
    flops = int(per_seq.sum())
    full = int(model_flops(cfg, n_tokens, None, head).sum()) if units is not None else flops
    padded = int(model_flops(cfg, padded_len, None, head).sum()) if (padded_len != n_tokens).any() else full
    return {"flops": flops, "flops_full": full, "flops_full_padded": padded, "flops_per_sequence": per_seq}


def _resolve(name_or_path, hub=None) -> Path:
    """A local folder as it is; anything else is a hub id fetched by huggingface_hub (cache first).
    hub: snapshot_download's revision, cache_dir, local_files_only, token (those given)."""
    hub = {k: v for k, v in (hub or {}).items() if v is not None and v is not False}
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise CheckpointError(f"a checkpoint is a folder path or a hub id (a string), got {type(name_or_path).__name__}")
    if not str(name_or_path).strip():
        raise CheckpointError("the checkpoint name is empty: give a folder or a hub id (e.g. 'user/model')")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if hub:
            raise InputError(f"{path} is a local folder; {', '.join(hub)} apply to hub ids only")
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; give the folder that holds config.json and the weights")
    s = str(name_or_path)
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or not s:
        raise CheckpointError(f"{s}: no such directory")
    if not HUB_ID.fullmatch(s) or "--" in s or ".." in s:
        raise CheckpointError(f"{s!r}: no such directory, and not a hub id ('name' or 'user/name': letters, digits, "
                              f"'-', '_', '.'; at most 96 characters)")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(s, allow_patterns=NEEDED_FILES, **hub)
    except Exception as e:  # noqa: BLE001 - network, offline mode, missing repo: one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        rev = f" at revision {hub['revision']}" if "revision" in hub else ""
        raise CheckpointError(f"{s}: not a local directory, and the hub could not provide it{rev}"
                              f"{' (HF_HUB_OFFLINE is set and it is not in the cache)' if offline else ''}: "
                              f"{type(e).__name__}: {' '.join(str(e).split())}") from None  # one line
    return Path(local)


class Model:
    """A BERT checkpoint ready to run. Build it with `minifca.from_pretrained`."""

    def __init__(self, cfg: BertConfig, params: dict, tokenizer: Tokenizer | None, backend="numba", path=None,
                 sentence: SentenceConfig | None = None, threads: int | None = None):
        self.config, self.params, self.tokenizer, self.path = cfg, params, tokenizer, path
        self.sentence = sentence or SentenceConfig()  # how embed() pools, truncates, normalises (sentence.py)
        self.threads = check_threads(threads)         # the most threads a call uses (None: all configured)
        self.backend = backend
        self.ops = _backend_ops(backend, self)

    # ------------------------------------------------------------ inputs
    def tokenize(self, texts, pairs=None, max_length=None, truncation=None) -> Encoding:
        if self.tokenizer is None:
            raise InputError(f"{self.path}: this checkpoint has no tokenizer; call forward() with input_ids")
        return self.tokenizer(texts, pairs, max_length=max_length, truncation=truncation)

    def _check_ids(self, ids, mask, tt):
        ids = _array("input_ids", ids)
        one = ids.ndim == 1                                          # one sequence: [L] -> [1, L]
        if one:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers, got {ids.dtype}")
        mask = np.ones_like(ids) if mask is None else _mask_array(_array("attention_mask", mask, ids.shape, one))
        tt = np.zeros_like(ids) if tt is None else _array("token_type_ids", tt, ids.shape, one)
        if not np.issubdtype(tt.dtype, np.integer):
            raise InputError(f"token_type_ids must be integers, got {tt.dtype}")
        cfg = self.config
        if ids.shape[1] > cfg.max_position_embeddings:
            raise InputError(f"input length {ids.shape[1]} exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings}); tokenize with truncation=True")
        bad = (ids < 0) | (ids >= cfg.vocab_size)
        if bad.any():
            b, i = np.argwhere(bad)[0]
            raise InputError(f"token id {ids[b, i]} at [{b}, {i}] is outside the vocabulary [0, {cfg.vocab_size})")
        if ((tt < 0) | (tt >= cfg.type_vocab_size)).any():
            raise InputError(f"token_type_ids must lie in [0, {cfg.type_vocab_size}) (type_vocab_size)")
        if not (mask > 0).any(1).all():
            raise InputError("attention_mask has a row with no valid token")
        return ids.astype(np.int64), mask, tt.astype(np.int64)

    # ------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask=None, token_type_ids=None, fca: FCAConfig | None = None,
                output_hidden_states=False, output_attentions=False, trace=False, pad_to=None,
                threads=None) -> Output:
        with self.limit_threads(threads):
            return self._forward(input_ids, attention_mask, token_type_ids, fca, output_hidden_states,
                                 output_attentions, trace, pad_to)

    def limit_threads(self, threads=None):
        """A context manager: at most `threads` threads inside it (Numba and BLAS; threadlimit.py). The limit
        of one call: its own `threads=`, else the one of the call it is inside (embed -> forward), else the
        model's (from_pretrained). `with model.limit_threads(2): ...` limits every call in the block."""
        if threads is None and threadlimit.active():
            return nullcontext()
        return threadlimit.thread_limit(self.threads if threads is None else threads, numba=self.backend == "numba")

    def _forward(self, input_ids, attention_mask, token_type_ids, fca, output_hidden_states, output_attentions,
                 trace, pad_to) -> Output:
        ids, mask, tt = self._check_ids(input_ids, attention_mask, token_type_ids)
        cfg = self.config
        if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)) or pad_to < 0):
            raise InputError(f"pad_to must be a non-negative integer (a length for the padded FLOPs) or None, "
                             f"got {pad_to!r}")
        if fca is not None:
            if not isinstance(fca, FCAConfig):
                raise ConfigError(f"fca must be an FCAConfig or None, got {type(fca).__name__}")
            fca.check_layers(cfg.num_hidden_layers)
            if "token_classifier" in self.params:
                raise ConfigError(f"{self.path}: a token classifier (BertForTokenClassification) labels every input "
                                  f"token, and FCA merges tokens: run it without fca")
        p = self.params
        lin = self.ops.linear if self.backend == "numba" else reference.linear  # numba's: OpenBLAS's threads stay asleep
        with getattr(self.ops, "one_at_a_time", nullcontext)():      # Numba's workqueue layer: forwards (and their
            r = reference.bert_forward(self.params, cfg, ids, mask, tt, fca=fca, ops=self.ops,  # heads) take turns
                                       seeds=sequence_seeds(ids, mask) if fca is not None and per_sequence(
                                           fca, trace) else None,    # read by layers decided per sequence only
                                       output_hidden_states=output_hidden_states,
                                       output_attentions=output_attentions, trace=trace)
            x = r["last_hidden_state"]
            pooled = reference.pooler(x, **p["pooler"], linear=lin) if "pooler" in p else None
            logits = (reference.classifier(pooled, **p["classifier"], linear=lin) if "classifier" in p else
                      reference.classifier(x, **p["token_classifier"], linear=lin) if "token_classifier" in p  # [B, L, C]
                      else None)
        out = Output(x, r["mask"], r["sizes"], hidden_states=r["hidden_states"], attentions=r["attentions"],
                     trace=r["trace"], units=r["units"])
        out.pooler_output, out.logits = pooled, logits
        if logits is None and "mlm" in p and fca is None:
            out.logits = reference.mlm_head(x, **p["mlm"], act=cfg.hidden_act, eps=cfg.layer_norm_eps)
        elif logits is None and "mlm" in p:
            out.why_no_logits = ("no masked-LM logits with FCA: the head predicts the token at each input position, "
                                 "and FCA has merged positions into coarse units (run without fca for logits)")
        if not np.isfinite(x).all() or (out.logits is not None and not np.isfinite(out.logits).all()):
            raise InputError("the forward produced non-finite values (NaN/inf): an activation overflowed float32")
        out._counter = partial(_count_flops, cfg, tuple(h in p for h in ("pooler", "classifier", "token_classifier")),
                               (mask > 0).sum(1), r["units"], ids.shape[1] if pad_to is None else int(pad_to))
        return out

    def __call__(self, enc: Encoding, fca: FCAConfig | None = None, **kw) -> Output:
        if not isinstance(enc, Encoding):
            raise InputError("model(enc) takes the Encoding that model.tokenize(...) returns; "
                             "use model.forward(input_ids, ...) for raw arrays")
        return self.forward(enc.input_ids, enc.attention_mask, enc.token_type_ids, fca=fca, **kw)

    # ------------------------------------------------------------ common jobs
    def batches(self, texts, pairs=None, batch_size=32, max_length=None, truncation=None):
        """(rows, Encoding) per batch of `batch_size` texts, longest first; rows [b] are the batch's positions
        in `texts`. Sorted by token count, each batch pads to a length its texts share (sentence-transformers'
        encode sorts too), so little padding is computed (tests/test_embed.py counts it on SST-2 sentences)."""
        texts, pairs = _texts(texts, pairs, batch_size)
        if self.tokenizer is None:
            raise InputError(f"{self.path}: this checkpoint has no tokenizer; call forward() with input_ids")
        encs = self.tokenizer.encode(texts, pairs, max_length=max_length, truncation=truncation)
        lengths = np.array([len(e.ids) for e in encs])               # [N]
        order = np.argsort(-lengths, kind="stable")                  # [N] longest first, ties in input order
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]                           # [b]
            yield rows, self.tokenizer.pad([encs[j] for j in rows], tokens=False)

    def sentence_inputs(self, texts, max_length=None, truncation=None):
        """(texts, max_length, truncation) as embedding uses them: a sentence-transformers checkpoint's
        do_lower_case applied, and its max_seq_length (truncating) unless max_length is given. Raises the
        ConfigError of a module or pooling mode it cannot follow."""
        st = self.sentence
        st.check()
        texts, _ = _texts(texts, None, 1)
        if st.do_lower_case:
            texts = [t.lower() if isinstance(t, str) else t for t in texts]
        if max_length is None and st.max_seq_length is not None and truncation is not False:
            max_length, truncation = min(st.max_seq_length, self.config.max_position_embeddings), True
        return texts, max_length, truncation

    def embed_batches(self, texts, fca=None, batch_size=32, max_length=None, truncation=None, normalize=None):
        """(rows, vectors [b, H] float32) per batch as it is computed, longest texts first: what `embed`
        puts back in input order (vectors[i] is the embedding of texts[rows[i]]). For streaming jobs: one
        batch at a time, with every thread (embed runs several side by side)."""
        return self._embedded(texts, fca, batch_size, max_length, truncation, normalize, workers=1)

    def _embedded(self, texts, fca, batch_size, max_length, truncation, normalize, workers):
        texts, max_length, truncation = self.sentence_inputs(texts, max_length, truncation)
        batches = self.batches(texts, None, batch_size, max_length, truncation)
        return threadlimit.side_by_side(lambda b: (b[0], self.embed_encoding(b[1], fca, normalize)), batches, workers)

    def _workers(self, threads, n_texts, batch_size):
        """How many batches embed and classify run side by side (threadlimit.side_by_side): one per thread (the
        call's threads=, else the limit it runs in, else the model's, else every CPU this process may use),
        when there are that many batches; 1 on the GPU, and where Numba's workqueue layer makes forwards take
        turns (kernels/cpu.one_at_a_time)."""
        threads = check_threads(threads) or threadlimit.current() or self.threads or len(os.sched_getaffinity(0))
        if self.backend == "cuda" or threads < 2 or n_texts <= batch_size:
            return 1
        if not isinstance(getattr(self.ops, "one_at_a_time", nullcontext)(), nullcontext):
            return 1
        return min(threads, -(-n_texts // batch_size))

    def embed_encoding(self, enc, fca=None, normalize=None) -> np.ndarray:
        """The vectors [b, H] float32 of one tokenized batch (Encoding): pooled as the checkpoint says, unit length
        if `normalize` (None: as the checkpoint says). What embed_batches computes per batch."""
        out = self(enc, fca=fca)
        v = pool(out.last_hidden_state, out.mask, out.sizes, self.sentence.pooling)  # [b, H]
        return l2_normalize(v) if (self.sentence.normalize if normalize is None else normalize) else v

    def embed(self, texts, fca=None, batch_size=32, max_length=None, truncation=None, normalize=None,
              show_progress_bar=False, threads=None, *, normalize_embeddings=None, convert_to_numpy=True,
              convert_to_tensor=False):
        """Sentence embeddings [N, H] float32 in the order of `texts`, or [H] for a single string.

        Follows a sentence-transformers checkpoint's files (minifca/sentence.py): pooling (mean, or [CLS]),
        truncation to its max_seq_length, unit length when it lists a Normalize module. Without those files:
        mean pooling, not normalised. `normalize` (or encode's name `normalize_embeddings`) overrides the
        checkpoint; `max_length` overrides max_seq_length. encode's `batch_size`, `show_progress_bar`,
        `convert_to_numpy` (False: a list of [H] arrays) mean what they mean there; `convert_to_tensor`
        cannot be honoured (no torch here: wrap the result with torch.from_numpy).
        """
        norm = _same("normalize", normalize, "normalize_embeddings", normalize_embeddings)
        if convert_to_tensor:
            raise InputError("convert_to_tensor=True: minifca returns NumPy arrays (no torch); "
                             "use torch.from_numpy(model.embed(...))")
        single = isinstance(texts, str)
        texts, _ = _texts(texts, None, batch_size)
        emb = np.empty((len(texts), self.config.hidden_size), np.float32)  # [N, H]
        workers = self._workers(threads, len(texts), batch_size)
        with self.limit_threads(threads), progress(len(texts), "embed", show_progress_bar) as bar:
            for rows, v in self._embedded(texts, fca, batch_size, max_length, truncation, norm, workers):
                emb[rows] = v                                        # [b, H] back in input order
                bar.update(len(rows))
        if single:
            return emb[0]                                            # [H]
        return emb if convert_to_numpy else list(emb)

    def classify(self, texts, pairs=None, fca=None, batch_size=32, max_length=None, truncation=None,
                 show_progress_bar=False, threads=None):
        """[(label, probabilities)] per text, in the order of `texts` (one tuple for a single string);
        needs a checkpoint with a classifier head."""
        if "token_classifier" in self.params:
            raise CheckpointError(f"{self.path}: this checkpoint classifies tokens (BertForTokenClassification), not "
                                  f"sentences: its per-token logits are forward(...).logits [B, L, C]")
        if "classifier" not in self.params:
            raise CheckpointError(f"{self.path}: this checkpoint has no classifier head (classifier.*)")
        single = isinstance(texts, str)
        texts, pairs = _texts(texts, pairs, batch_size)
        res = [None] * len(texts)
        workers = self._workers(threads, len(texts), batch_size)
        batches = self.batches(texts, pairs, batch_size, max_length, truncation)
        with self.limit_threads(threads), progress(len(texts), "classify", show_progress_bar) as bar:
            for rows, probs in threadlimit.side_by_side(lambda b: (b[0], reference.softmax(  # [b, C]
                    self(b[1], fca=fca).logits.astype(np.float64))), batches, workers):
                for r, p in zip(rows, probs):
                    res[r] = (self.config.id2label[int(p.argmax())], p)
                bar.update(len(rows))
        return res[0] if single else res


def _same(name, value, alias, alias_value):
    """One setting given under minifca's name or sentence-transformers' (None = not given)."""
    if value is not None and alias_value is not None and bool(value) != bool(alias_value):
        raise InputError(f"{name}={value!r} and {alias}={alias_value!r} disagree; they are the same setting")
    return value if value is not None else alias_value


def _array(name, x, shape=None, one=False):
    """np.asarray(x), with an InputError naming the argument instead of NumPy's.

    shape: the exact shape x must have (input_ids'); one: input_ids was one sequence [L], so
    [L] is accepted too. Never reshaped: a transposed mask of the same size is a mistake.
    """
    try:
        a = np.asarray(x)
    except (ValueError, TypeError):
        raise InputError(f"{name} must be a rectangular [batch, length] array (rows of equal length; "
                         f"pad them and give an attention_mask)") from None
    if shape is not None:
        if one and a.shape == tuple(shape[1:]):
            a = a[None]
        if a.shape != tuple(shape):
            raise InputError(f"{name} has shape {a.shape}, input_ids has {tuple(shape)}: they must match exactly")
    return a


def _mask_array(mask):
    """An attention_mask as int64 0/1: booleans, or numbers that are all 0 or 1 (not 2, -1, 0.5 or NaN)."""
    if mask.dtype.kind not in "biuf":
        raise InputError(f"attention_mask must be 0/1 numbers or booleans, got dtype {mask.dtype}")
    if mask.dtype.kind != "b":
        bad = (mask != 0) & (mask != 1)
        if bad.any():
            b, i = np.argwhere(bad)[0]
            raise InputError(f"attention_mask must hold 0 (padding) or 1 (token); [{b}, {i}] is {mask[b, i]}")
    return mask.astype(np.int64)


def _texts(texts, pairs, batch_size):
    """The texts (and pairs) of embed/classify as lists, checked once before any batch is tokenized."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or isinstance(texts, (bytes, bytearray, dict)) or not hasattr(texts, "__iter__"):
        raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise InputError("empty input: give at least one text")
    if isinstance(pairs, str):
        pairs = [pairs]
    if pairs is not None:
        if isinstance(pairs, (bytes, bytearray, dict)) or not hasattr(pairs, "__iter__"):
            raise InputError(f"pairs must be a string or a list of strings, got {type(pairs).__name__}")
        pairs = list(pairs)
        if len(pairs) != len(texts):
            raise InputError(f"{len(texts)} texts but {len(pairs)} pairs: give one second sentence per text")
    return texts, pairs


def _backend_ops(backend, model):
    if backend == "numpy":
        return reference
    if backend == "numba":
        from .kernels import cpu
        return cpu
    if backend == "cuda":
        from .kernels import cuda
        return cuda.ops_for(model)
    raise ConfigError(f"backend {backend!r} unknown; choose from {', '.join(BACKENDS)}")


def from_pretrained(name_or_path, backend="numba", *, threads=None, revision=None, cache_dir=None,
                    local_files_only=False, token=None, mmap=True) -> Model:
    """Load a BERT checkpoint from a folder (or a hub id): config.json + safetensors + tokenizer.

    threads: the most threads each call may use (Numba and BLAS; None: all configured; a call's own
    `threads=` overrides it). revision, cache_dir, local_files_only, token: for a hub id, passed to
    huggingface_hub's snapshot_download (a branch, tag or commit; the cache folder; no network; an
    access token), as transformers' from_pretrained takes them.
    mmap=True (the default) memory-maps the weights: no copy, and pages are read as they are used.
    If the file is truncated or replaced while the model is in use, the OS kills the process with
    SIGBUS (as with any memory-mapped file). mmap=False reads the tensors into memory instead.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} unknown; choose from {', '.join(BACKENDS)}")
    if not isinstance(mmap, (bool, np.bool_)):
        raise ConfigError(f"mmap must be True or False, got {mmap!r}")
    check_threads(threads)
    folder = _resolve(name_or_path, {"revision": revision, "cache_dir": cache_dir,
                                     "local_files_only": local_files_only, "token": token})
    cfg = BertConfig.from_json(folder / "config.json")
    files = find_weight_files(folder)
    params = to_params(load_state(files, cfg, mmap=bool(mmap)), cfg)
    release_pages(params)                                            # pages the load-time checks read
    if backend == "numba":
        from .kernels import cpu
        cpu.lay_out(params, after_each_layer=release_pages)          # the layout its products want, once
    tok = None
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
        tok = Tokenizer.from_folder(folder, cfg.max_position_embeddings, cfg.pad_token_id)
    return Model(cfg, params, tok, backend=backend, path=folder, sentence=SentenceConfig.from_folder(folder),
                 threads=threads)
