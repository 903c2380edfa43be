"""FCA: fine- and coarse-granularity hybrid self-attention (Zhao et al., ACL 2022), in NumPy.

After the attention sub-layer of an FCA layer (see `reference.bert_forward`), each sequence's
valid units are
  1. scored      s = SCORES[rule](...)                  one number per unit
  2. selected    [CLS] + the k_l - 1 best others -> fine units, original order kept
  3. aggregated  the rest U -> coarse units: AGGREGATES[rule] gives every member of U a group
                 and a weight (weights >= 0, summing to 1 in each group); coarse = sum w_j x_j
and the shortened sequence (fine units, then coarse units, then padding) goes on to the FFN.
Every unit carries its size: how many input tokens it stands for.

Adding an ablation is one function and one name:

    @register_score("my_rule")
    def my_rule(stats, x, keys, rng):   # stats: {"received", "cls", "entropy"} each [n]; x, keys [n, H]
        return ...                      # [n] higher = more informative

and the facts the fast paths need are registered with it, in the same line: a rule that scores a whole
batch at once (`batched=True`: no keys, no rng, fn(stats [B, n], x [B, n, H], None, None) -> [B, n])
runs batched in NumPy, in Numba and on the GPU; one that returns a statistic as it is (`stat="cls"`)
is read on the GPU where the statistic was computed. An aggregation rule says how many coarse units
it makes (`coarse_units`) and, if batched, how it weighs each group (`weights`). Every table of the
fast paths (kernels/cpu.py, kernels/cuda.py, `batchable`, `batch_plan`, ablate's grid) is derived
from these facts.
"""
from __future__ import annotations

import itertools
import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError

# ---------------------------------------------------------------- scoring rules

ATTENTION_STATS = ("received", "cls", "entropy")  # what `reference.attention_stats` gives every rule


@dataclass(frozen=True)
class ScoreFacts:
    """What the fast paths need to know about a scoring rule; registered with it (`register_score`)."""
    stat: str | None = None  # the rule returns this statistic of the layer as it is: one of ATTENTION_STATS,
                             # or "hidden_norm" (each unit's L2 norm); the GPU reads it where it computed it
    batched: bool = False    # fn(stats [B, n], x [B, n, H], None, None) scores a whole batch (no keys, no rng)
    hidden: bool = True      # reads the hidden states x
    stats: bool = True       # reads the attention statistics (asked of the attention only then)


SCORES = {}        # name -> fn(stats, x, keys, rng) -> [n]
SCORE_FACTS = {}   # name -> (fn, ScoreFacts): the facts hold for the function they were registered with


def register_score(name, *, stat=None, batched=False, hidden=None, stats=None):
    """Register fn(stats, x, keys, rng) -> [n] scores as the rule `name`, with its facts (see ScoreFacts):
    by default a rule reads everything and runs one sequence at a time; `stat` implies what it reads."""
    if stat is not None and stat not in ATTENTION_STATS + ("hidden_norm",):
        raise ConfigError(f"score {name!r}: stat {stat!r} unknown; choose from "
                          f"{', '.join(ATTENTION_STATS + ('hidden_norm',))}")
    facts = ScoreFacts(stat, bool(batched), (stat is None or stat == "hidden_norm") if hidden is None else hidden,
                       (stat is None or stat in ATTENTION_STATS) if stats is None else stats)

    def deco(fn):
        SCORES[name], SCORE_FACTS[name] = fn, (fn, facts)
        return fn
    return deco


def score_facts(name) -> ScoreFacts:
    """The facts of the scoring rule now under `name` (a function put there without them has the defaults)."""
    fn, facts = SCORE_FACTS.get(name, (None, None))
    return facts if fn is not None and SCORES.get(name) is fn else ScoreFacts()


@register_score("attention_received", stat="received", batched=True)
def attention_received(stats, x, keys, rng):
    """The paper's (and PoWER-BERT's) rule: attention received from the other units."""
    return stats["received"]                                         # [n]


@register_score("cls_attention", stat="cls", batched=True)
def cls_attention(stats, x, keys, rng):
    """Attention that [CLS] pays to each unit."""
    return stats["cls"]                                              # [n]


@register_score("hidden_norm", stat="hidden_norm", batched=True)
def hidden_norm(stats, x, keys, rng):
    """L2 norm of the unit's hidden state after Add & LayerNorm."""
    return np.sqrt((x.astype(np.float64) ** 2).sum(-1))              # [n, H] -> [n]


@register_score("attention_entropy", stat="entropy", batched=True)
def attention_entropy(stats, x, keys, rng):
    """Entropy of the unit's own attention row: units that gather from many others score higher."""
    return stats["entropy"]                                          # [n]


@register_score("random", hidden=False)
def random_score(stats, x, keys, rng):
    """The floor every rule must beat; seeded by (seed, layer, the sequence's tokens)."""
    return rng.random(len(x))                                        # [n]


# ---------------------------------------------------------------- aggregation rules
# Each takes the non-selected units U (in sequence order): their scores [m], sizes [m],
# keys [m, H] and the number of coarse units c; it returns groups [m] (coarse unit of each
# member, -1 = dropped) and weights [m] (>= 0, summing to 1 within each group).



@dataclass(frozen=True)
class AggregateFacts:
    """What the fast paths need to know about an aggregation rule; registered with it (`register_aggregate`)."""
    coarse_units: str = "clusters"  # how many it makes: "none" (U dropped), "one", or "clusters" (FCAConfig.clusters)
    weights: str | None = None      # batched: how each group's members are weighed: "sizes" (size-weighted mean)
                                    # or "softmax" (of their scores, within the group)
    batched: bool = False           # groups U into contiguous chunks by position (one chunk per coarse unit) and
                                    # weighs them by `weights`, reading no keys: the batched paths can run it


AGGREGATES = {}        # name -> fn(scores, sizes, keys, c) -> (groups, weights)
AGGREGATE_FACTS = {}   # name -> (fn, AggregateFacts): the facts hold for the function they were registered with
COARSE_UNITS = ("none", "one", "clusters")


def register_aggregate(name, *, coarse_units="clusters", weights=None, batched=False):
    """Register fn(scores, sizes, keys, c) -> (groups, weights) as the rule `name`, with its facts (see
    AggregateFacts): by default a rule is handed FCAConfig.clusters as c and runs one sequence at a time."""
    if coarse_units not in COARSE_UNITS:
        raise ConfigError(f"aggregate {name!r}: coarse_units {coarse_units!r} unknown; choose from "
                          f"{', '.join(COARSE_UNITS)}")
    if batched and coarse_units != "none" and weights not in ("sizes", "softmax"):
        raise ConfigError(f"aggregate {name!r}: a batched rule weighs its groups by 'sizes' or 'softmax', "
                          f"got weights={weights!r}")
    facts = AggregateFacts(coarse_units, weights, bool(batched))

    def deco(fn):
        AGGREGATES[name], AGGREGATE_FACTS[name] = fn, (fn, facts)
        return fn
    return deco


def aggregate_facts(name) -> AggregateFacts:
    """The facts of the aggregation rule now under `name` (a function put there without them has the defaults)."""
    fn, facts = AGGREGATE_FACTS.get(name, (None, None))
    return facts if fn is not None and AGGREGATES.get(name) is fn else AggregateFacts()


def coarse_units(aggregate, clusters):
    """How many coarse units the rule `aggregate` makes with FCAConfig.clusters = clusters (before capping by |U|)."""
    return {"none": 0, "one": 1, "clusters": clusters}[aggregate_facts(aggregate).coarse_units]


def _softmax(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def _normalise_in_groups(groups, w):
    total = np.zeros(groups.max() + 1)
    np.add.at(total, groups, w)
    return w / total[groups]


def _softmax_in_groups(groups, s):
    """softmax of s within each group (each group shifted by its own max, so none underflows to 0/0)."""
    top = np.full(groups.max() + 1, -np.inf)
    np.maximum.at(top, groups, s)
    return _normalise_in_groups(groups, np.exp(s - top[groups]))


@register_aggregate("drop", coarse_units="none", batched=True)
def drop(scores, sizes, keys, c):
    """PoWER-BERT: the non-selected units are discarded."""
    m = len(scores)
    return np.full(m, -1), np.zeros(m)


@register_aggregate("mean", coarse_units="one", weights="sizes", batched=True)
def mean(scores, sizes, keys, c):
    """One coarse unit: the plain average of the input tokens it holds (size-weighted)."""
    return np.zeros(len(scores), dtype=np.int64), sizes / sizes.sum()


@register_aggregate("weighted", coarse_units="one", weights="softmax", batched=True)
def weighted(scores, sizes, keys, c):
    """The paper's rule: one coarse unit, alpha = softmax(scores of U)."""
    return np.zeros(len(scores), dtype=np.int64), _softmax(scores.astype(np.float64))


@register_aggregate("clusters", weights="softmax", batched=True)
def clusters(scores, sizes, keys, c):
    """The paper's FCA-k: U split into c contiguous chunks by position, softmax weights in each."""
    m = len(scores)
    c = min(c, m)
    groups = np.repeat(np.arange(c), [len(a) for a in np.array_split(np.arange(m), c)])  # [m] chunk of each
    return groups, _softmax_in_groups(groups, scores.astype(np.float64))


@register_aggregate("similarity")
def similarity(scores, sizes, keys, c):
    """ToMe-style bipartite merging on keys until c groups remain; size-weighted averages."""
    m = len(scores)
    groups = np.arange(m)
    sizes = sizes.astype(np.float64)
    while groups.max() + 1 > c:
        g = groups.max() + 1
        feat = np.zeros((g, keys.shape[1]))                          # size-weighted mean key of each group
        np.add.at(feat, groups, keys * sizes[:, None])
        feat /= np.linalg.norm(feat, axis=1, keepdims=True) + 1e-12
        A, Bs = np.arange(0, g, 2), np.arange(1, g, 2)               # alternate groups: sources A, targets B
        sim = feat[A] @ feat[Bs].T                                   # [|A|, |B|]
        best = sim.argmax(1)
        r = min(len(A), g - c)
        merged = np.argsort(-sim[np.arange(len(A)), best], kind="stable")[:r]
        target = np.arange(g)
        target[A[merged]] = Bs[best[merged]]
        _, groups = np.unique(target[groups], return_inverse=True)   # relabel 0..g'-1 in order
    return groups, _normalise_in_groups(groups, sizes)


# ---------------------------------------------------------------- configuration


@dataclass
class FCAConfig:
    """How FCA shortens the sequence.

    keep: a ratio of each sequence's own valid length (one float for every layer from
    `start_layer`, or a list of floats, one per layer), or absolute counts (a list of ints,
    one per layer). k_l, the number of fine units at layer l, includes [CLS]:
    k_l = ceil(ratio * valid_length), at least 1. A layer is left alone (not scored, nothing
    moves) where k_l is not below the units entering it, or where the aggregation rule would
    make every unit left over a coarse unit on its own (e.g. one unit left and one coarse unit),
    since nothing would shrink. Values must not increase from layer to layer.
    """
    keep: float | list = 0.5
    score: str = "attention_received"
    aggregate: str = "weighted"
    clusters: int = 1
    proportional_attention: bool = False
    start_layer: int = 0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.keep, tuple):
            self.keep = list(self.keep)
        for name in ("score", "aggregate"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"FCA {name} must be a rule's name (a string), got {getattr(self, name)!r}")
        if self.score not in SCORES:
            raise ConfigError(f"FCA score {self.score!r} unknown; choose from {', '.join(SCORES)}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"FCA aggregate {self.aggregate!r} unknown; choose from {', '.join(AGGREGATES)}")
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, (int, np.integer)) or self.clusters < 1:
            raise ConfigError(f"FCA clusters must be a positive integer, got {self.clusters!r}")
        if self.clusters > 1 and aggregate_facts(self.aggregate).coarse_units != "clusters":
            several = [a for a in AGGREGATES if aggregate_facts(a).coarse_units == "clusters"]
            raise ConfigError(f"FCA clusters={self.clusters} needs aggregate {' or '.join(map(repr, several))} "
                              f"('{self.aggregate}' makes one coarse unit)")
        for name in ("start_layer", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ConfigError(f"FCA {name} must be a non-negative integer, got {v!r}")
        if not isinstance(self.proportional_attention, (bool, np.bool_)):
            raise ConfigError(f"FCA proportional_attention must be true or false, got {self.proportional_attention!r}")
        keep = self.keep
        if isinstance(keep, list):
            if not keep:
                raise ConfigError("FCA keep list is empty")
            if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in keep):
                if min(keep) < 1:
                    raise ConfigError(f"FCA keep counts must be >= 1, got {keep}")
            elif all(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) for v in keep):
                if not all(0 < float(v) <= 1 for v in keep) or not all(map(math.isfinite, map(float, keep))):
                    raise ConfigError(f"FCA keep ratios must be in (0, 1], got {keep}")
                keep = self.keep = [float(v) for v in keep]
            else:
                raise ConfigError(f"FCA keep must be floats (ratios) or ints (counts), not a mix: {keep}")
            if any(b > a for a, b in itertools.pairwise(keep)):
                raise ConfigError(f"FCA keep must not increase from layer to layer, got {keep}")
        elif isinstance(keep, (int, float, np.floating, np.integer)) and not isinstance(keep, bool):
            if not (0 < float(keep) <= 1) or not math.isfinite(float(keep)):
                raise ConfigError(f"FCA keep ratio must be in (0, 1], got {keep}")
            self.keep = float(keep)
        else:
            raise ConfigError(f"FCA keep must be a ratio, a list of ratios or a list of counts, got {keep!r}")

    @property
    def counts(self) -> bool:
        return isinstance(self.keep, list) and isinstance(self.keep[0], (int, np.integer))

    def check_layers(self, num_layers: int):
        if isinstance(self.keep, list) and len(self.keep) != num_layers:
            raise ConfigError(f"FCA keep has {len(self.keep)} entries but the model has {num_layers} layers")
        if self.start_layer >= num_layers:
            raise ConfigError(f"FCA start_layer {self.start_layer} >= the model's {num_layers} layers")

    def _value(self, layer):
        return self.keep[layer] if isinstance(self.keep, list) else self.keep

    def active(self, layer: int) -> bool:
        """Does layer `layer` select and aggregate at all?"""
        return layer >= self.start_layer and (self.counts or self._value(layer) < 1.0)

    def k(self, layer: int, n_tokens: int, n_in: int) -> int:
        """Fine units (with [CLS]) kept at `layer` for a sequence of n_tokens valid tokens and n_in units."""
        return int(self.ks(layer, [n_tokens], [n_in])[0])

    def ks(self, layer: int, n_tokens, n_in) -> np.ndarray:
        """`k` of every sequence of a batch: n_tokens, n_in [B] -> [B] int64 (ceil(keep x tokens), or the count;
        at least 1, at most the units there are)."""
        v = self._value(layer)
        n_tokens = np.asarray(n_tokens, np.float64)
        k = np.full(n_tokens.shape, int(v), np.int64) if self.counts else np.ceil(v * n_tokens - 1e-9).astype(np.int64)
        return np.maximum(1, np.minimum(k, np.asarray(n_in, np.int64)))

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for people: 'keep 0.5, score attention_received, aggregate weighted[, 2 clusters]...'."""
        keep = ",".join(f"{v:g}" for v in self.keep) if isinstance(self.keep, list) else f"{self.keep:g}"
        s = f"keep {keep}, score {self.score}, aggregate {self.aggregate}"
        if self.clusters > 1:
            s += f", {self.clusters} clusters"
        if self.proportional_attention:
            s += ", proportional attention"
        if self.start_layer:
            s += f", from layer {self.start_layer}"
        return s

    def save(self, path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict, source="schedule") -> FCAConfig:
        if not isinstance(d, dict) or "keep" not in d:
            raise ConfigError(f"{source}: an FCA schedule is a JSON object with at least 'keep'")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known - {"comment", "meta"}
        if unknown:
            raise ConfigError(f"{source}: unknown FCA field(s) {', '.join(sorted(unknown))}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except ConfigError as e:                                     # name the file the bad value came from
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path) -> FCAConfig:
        path = Path(path)
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path}: not a file (an FCA schedule is a JSON file)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: schedule file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (an FCA schedule is a JSON file)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the schedule ({e.strerror or e})") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, source=str(path))


# ---------------------------------------------------------------- one reduction step


def select(scores, k):
    """[CLS] (unit 0) plus the k-1 best-scoring others, in sequence order; ties go to the earlier unit."""
    order = 1 + np.argsort(-scores[1:], kind="stable")               # [n-1] best first
    return np.sort(np.concatenate([[0], order[:k - 1]]))             # [k]


def reduce_sequence(cfg, layer, x, sizes, stats, keys, rng, n_tokens):
    """One sequence's valid units -> (fine indices [k], U indices [m], groups [m], weights [m]).

    x [n, H], sizes [n], stats {name: [n]}, keys [n, H] hold the valid units only.
    """
    n = len(x)
    k = cfg.k(layer, n_tokens, n)
    alone = np.arange(n), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    if k >= n:
        return alone
    s = checked_scores(cfg.score, SCORES[cfg.score](stats, x, keys, rng), n)  # [n]
    fine = select(s, k)                                              # [k]
    rest = np.delete(np.arange(n), fine)                             # [m] in sequence order
    groups, w = checked_groups(cfg.aggregate, AGGREGATES[cfg.aggregate](s[rest], sizes[rest],
                                                                        keys[rest].astype(np.float64), cfg.clusters),
                               len(rest))                           # [m], [m]
    if (groups >= 0).all() and len(np.unique(groups)) == len(rest):  # each unit left would be a coarse unit
        return alone                                                 # on its own: nothing shrinks, layer left alone
    return fine, rest, groups, w


def _what(v) -> str:
    """A short description of what a rule returned, for its error message."""
    a = np.asarray(v, dtype=object) if not isinstance(v, np.ndarray) else v
    text = " ".join(str(v).split())                                  # one line
    return f"{type(v).__name__} of shape {a.shape}, dtype {getattr(v, 'dtype', a.dtype)}: {text[:60]}"


def checked_scores(rule, s, n) -> np.ndarray:
    """A score rule's output as float64 [n]; ConfigError naming the rule unless it is n finite numbers."""
    try:
        a = np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"FCA score rule {rule!r} returned {_what(s)}; expected {n} numbers") from None
    if a.shape != (n,):
        raise ConfigError(f"FCA score rule {rule!r} returned {_what(s)}; expected one score per unit, shape ({n},)")
    if not np.isfinite(a).all():
        raise ConfigError(f"FCA score rule {rule!r} returned non-finite scores (e.g. {a[~np.isfinite(a)][0]}); "
                          f"scores must be finite numbers")
    return a


def checked_groups(rule, out, m):
    """An aggregation rule's (groups, weights) for m units, checked against the contract in the module doc.

    groups: m integers, -1 (dropped) or a coarse unit 0..G-1, each of the G used, G <= m; weights: m finite
    numbers >= 0, summing to 1 in each group (within float32 rounding: each weight off by at most 2^-24 of
    itself, so a group's sum by at most m * 2^-23, plus 1e-6 of slack for float64 rules). ConfigError naming
    the rule otherwise.
    """
    try:
        groups, w = out
        g, w = np.asarray(groups), np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"FCA aggregate rule {rule!r} returned {_what(out)}; expected (groups, weights)") from None
    if g.shape != (m,) or w.shape != (m,):
        raise ConfigError(f"FCA aggregate rule {rule!r} returned groups of shape {g.shape} and weights of shape "
                          f"{w.shape}; expected one of each per unit left, shape ({m},)")
    if g.dtype.kind not in "iu" and not (g.dtype.kind == "f" and np.isfinite(g).all() and (g == np.round(g)).all()):
        raise ConfigError(f"FCA aggregate rule {rule!r} returned groups of dtype {g.dtype}; expected integers")
    g = g.astype(np.int64)
    used = np.unique(g[g >= 0])
    if (g < -1).any() or (len(used) and (used[-1] >= m or len(used) != used[-1] + 1)):
        raise ConfigError(f"FCA aggregate rule {rule!r} returned groups {g.tolist()[:12]}; each must be -1 (dropped) "
                          f"or a coarse unit 0..G-1 with every one of them used and G <= {m} (the units left)")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ConfigError(f"FCA aggregate rule {rule!r} returned weights {w.tolist()[:12]}; they must be finite "
                          f"and >= 0")
    if len(used):
        total = np.zeros(len(used))
        np.add.at(total, g[g >= 0], w[g >= 0])
        off = np.abs(total - 1)
        if (off > 1e-6 + m * 2.0 ** -23).any():
            bad = int(np.argmax(off))
            raise ConfigError(f"FCA aggregate rule {rule!r}: the weights of coarse unit {bad} sum to {float(total[bad])!r}, "
                              f"not 1")
    return g, w


def merge(x, sizes, fine, rest, groups, w):
    """Fine units then coarse units: coarse_g = sum over members of w_j x_j; sizes add up."""
    c = int(groups.max()) + 1 if len(groups) and groups.max() >= 0 else 0
    W = np.zeros((c, len(rest)))                                     # [c, m] weight of member j in unit g
    kept = groups >= 0
    W[groups[kept], np.flatnonzero(kept)] = w[kept]
    member = np.arange(c)[:, None] == groups[None, :]              # [c, m] membership (even at weight 0)
    new_x = np.concatenate([x[fine], (W @ x[rest]).astype(x.dtype)])  # [k + c, H]
    new_sizes = np.concatenate([sizes[fine], member @ sizes[rest]]).astype(sizes.dtype)  # [k + c]
    return new_x, new_sizes, W


@dataclass
class FCAState:
    """What FCA tracks across layers: per-layer unit counts (for FLOPs) and, if asked, the trace."""
    n_tokens: np.ndarray                      # [B] valid input tokens per sequence
    seeds: np.ndarray                         # [B] seeds of the random rule, one per sequence
    units: list = field(default_factory=list)  # per layer: dict of [B] arrays n_in, n_out, n_merged, scored
    trace: list | None = None                 # per layer: per sequence: list of units
    members: list | None = None               # per sequence: [n, L] weight of each input position in each unit
    inside: list | None = None                # per sequence: [n, L] 1 where the input position belongs to the unit
    n_fine: list | None = None                # per sequence: how many leading units are fine units
    idle: tuple | None = None                 # (cfg, keep value, batch shape) last passed by `leaves_alone`
    planned: tuple | None = None              # (cfg, layer, valid, BatchPlan) of `leaves_alone`'s last batch_plan

    @classmethod
    def start(cls, mask, seeds, trace):
        n_tokens = mask.sum(1).astype(np.int64)
        seeds = np.zeros(len(mask), np.int64) if seeds is None else np.asarray(seeds)
        members = inside = None
        if trace:
            eye = np.eye(mask.shape[1])
            members = [eye[m > 0] for m in mask]                     # [n, L] unit u = its input position
            inside = [M.copy() for M in members]
        return cls(n_tokens, seeds, [], [] if trace else None, members, inside, [int(n) for n in n_tokens])

    def record(self, layer, mask, merged=None, scored=None):
        n = mask.sum(1).astype(np.int64)
        self.units.append({"n_in": n if merged is None else merged[0], "n_out": n,
                           "n_merged": np.zeros_like(n) if merged is None else merged[1],
                           "scored": np.zeros(len(n), bool) if scored is None else scored})
        if merged is not None:
            self.n_fine = list(merged[2])
        if self.trace is not None:
            self.trace.append([_describe(M, S, k) for M, S, k in zip(self.members, self.inside, self.n_fine)])

    def leaves_alone(self, layer, cfg, mask) -> bool:
        """Would `reduce` return this layer's batch exactly as it is? So when no unit is padding (else it also
        re-packs the units and zeroes the padding) and, for the batched rules, `batch_plan` (from the mask alone)
        shrinks no sequence: e.g. every layer after a uniform keep's one cut, where each sequence has only its
        one coarse unit left to merge. Such a layer then needs neither the attention's statistics nor a reduce."""
        valid = np.asarray(mask) > 0
        if not valid.all() or not self.batched(cfg):
            return False
        key = (cfg, cfg._value(layer), valid.shape)                  # all batch_plan reads of the layer and of
        if key != self.idle:                                         # an all-valid mask (so a uniform keep's
            if self._plan(cfg, layer, valid).active.any():           # layers after the cut are decided once:
                return False                                         # this runs between kernels, where
            self.idle = key                                          # Python's own work is slow)
        return True

    def _plan(self, cfg, layer, valid):
        """batch_plan(cfg, layer, self.n_tokens, valid), computed once for the layer's `leaves_alone` and its
        `reduce` (they ask with the same mask)."""
        hit = self.planned
        if hit is None or hit[0] is not cfg or hit[1] != layer or not np.array_equal(hit[2], valid):
            hit = self.planned = (cfg, layer, valid, batch_plan(cfg, layer, self.n_tokens, valid))
        return hit[3]

    def batched(self, cfg) -> bool:
        """Is this layer decided for the whole batch at once (rules with batched facts, no trace)?"""
        return not per_sequence(cfg, self.members is not None)

    def reduce(self, layer, cfg, x, mask, sizes, stats, keys, reduce_batch=None):
        """Shorten every sequence of the batch; returns x [B, n', H], mask [B, n'], sizes [B, n'].

        stats is None when the score reads no attention statistics. reduce_batch: the backend's own
        (same arguments as `reduce_batch` here, the default) for the layers decided batched."""
        if self.batched(cfg):                                        # same result, no Python per sequence
            return self._reduce_batched(layer, cfg, x, mask, sizes, stats, keys, reduce_batch)
        stats = stats or {}
        B, _, H = x.shape
        outs, n_in, n_merged, n_fine, scored = [], [], [], [], []
        for b in range(B):
            valid = np.flatnonzero(mask[b] > 0)
            rng = np.random.default_rng([cfg.seed, layer, int(self.seeds[b]) & 0xFFFFFFFF])
            st = {name: v[b, valid] for name, v in stats.items()}
            fine, rest, groups, w = reduce_sequence(cfg, layer, x[b, valid], sizes[b, valid], st,
                                                    keys[b, valid], rng, int(self.n_tokens[b]))
            new_x, new_sizes, W = merge(x[b, valid], sizes[b, valid], fine, rest, groups, w)
            outs.append((new_x, new_sizes))
            n_in.append(len(valid)), scored.append(len(rest) > 0)
            n_fine.append(len(fine) if len(rest) else self.n_fine[b])  # a layer left alone keeps the kinds
            n_merged.append(int((groups >= 0).sum()))                    # dropped units cost no aggregation
            if self.members is not None:
                M, S = self.members[b], self.inside[b]
                member = np.arange(W.shape[0])[:, None] == groups[None, :]  # [c, m]
                self.members[b] = np.concatenate([M[fine], W @ M[rest]])      # [k + c, L]
                self.inside[b] = np.concatenate([S[fine], member @ S[rest]])  # [k + c, L]
        n_out = max(len(s) for _, s in outs)
        new_x = np.zeros((B, n_out, H), x.dtype)
        new_mask = np.zeros((B, n_out), mask.dtype)
        new_sizes = np.zeros((B, n_out), sizes.dtype)
        for b, (xb, sb) in enumerate(outs):
            new_x[b, :len(sb)], new_mask[b, :len(sb)], new_sizes[b, :len(sb)] = xb, 1, sb
        self.record(layer, new_mask, merged=(np.array(n_in), np.array(n_merged), n_fine), scored=np.array(scored))
        return new_x, new_mask, new_sizes

    def _reduce_batched(self, layer, cfg, x, mask, sizes, stats, keys, apply=None):
        """`reduce` for the whole batch at once (rules with batched facts, no trace): same units, order, sizes.

        The counts come first (`batch_plan`: they do not depend on the scores); then `reduce_batch`,
        or the backend's own compiled one (`apply`), picks and merges the units.
        """
        valid = mask > 0                                             # [B, n]
        plan = self._plan(cfg, layer, valid)
        s = np.asarray(SCORES[cfg.score](stats, x, None, None), np.float64)  # [B, n]
        new_x, new_sizes = (apply or reduce_batch)(s, x, sizes, valid, plan.k, plan.c, plan.active, cfg.aggregate)
        self.record_plan(layer, plan)
        return new_x, plan.mask.astype(mask.dtype), new_sizes

    def record_plan(self, layer, plan):
        """`record` for a layer decided by `batch_plan`."""
        n_fine = [int(kb) if a else f for kb, a, f in zip(plan.k, plan.active, self.n_fine)]
        self.record(layer, plan.mask, merged=(plan.n_in, plan.n_merged, n_fine), scored=plan.active)


@dataclass
class BatchPlan:
    """How many units each sequence keeps and makes at one layer (all [B] int64, active bool)."""
    k: np.ndarray         # fine units, [CLS] included (when active)
    c: np.ndarray         # coarse units made (0 when not active)
    active: np.ndarray    # does the sequence shrink at this layer?
    n_in: np.ndarray      # valid units entering
    n_out: np.ndarray     # units leaving: k + c when active, else n_in
    n_merged: np.ndarray  # units of U folded into a coarse unit (0 for drop)

    @property
    def mask(self) -> np.ndarray:                                    # [B, N] the new mask, float32
        return (np.arange(int(self.n_out.max()))[None] < self.n_out[:, None]).astype(np.float32)


def batch_plan(cfg, layer, n_tokens, valid) -> BatchPlan:
    """The counts of a batched reduction, from the mask alone: no score is needed to know them."""
    nv = valid.sum(1).astype(np.int64)                               # [B] units entering
    k = cfg.ks(layer, n_tokens, nv)                                  # [B]
    m = nv - k                                                       # [B] |U|
    dropping = aggregate_facts(cfg.aggregate).coarse_units == "none"
    c = np.minimum(coarse_units(cfg.aggregate, cfg.clusters), m)   # [B]
    active = (m > 0) & (dropping | (c < m))                          # else each unit left would be its own coarse unit
    c = np.where(active, c, 0)
    n_out = units_out(valid, k, c, active)
    n_merged = np.where(active & (not dropping), m, 0).astype(np.int64)
    return BatchPlan(k, c, active, nv, n_out, n_merged)


def units_out(valid, k, c, active):
    """[B] units each sequence leaves a reduction with: k fine + c coarse when active, else all its valid ones."""
    return np.where(active, k, valid.sum(1)) + c


def reduce_batch(s, x, sizes, valid, k, c, active, aggregate):
    """Select and aggregate every sequence of a batch: the units of `batch_plan`, decided by the scores.

    s [B, n] float64 scores, x [B, n, H], sizes [B, n], valid [B, n] bool; k, c [B] int64 and
    active [B] bool from `batch_plan`; aggregate: a rule with batched facts (drop, mean, weighted, clusters).
    Returns new_x [B, N, H] (fine units, coarse units, zero padding) and new_sizes [B, N].
    """
    B, _n, H = x.shape
    fine = _select_batched(s, valid, k)                              # [B, n] [CLS] + the k-1 best
    keep = np.where(active[:, None], fine, valid)                    # [B, n] units copied as they are
    dropping = aggregate_facts(aggregate).coarse_units == "none"
    grouped = valid & ~fine & active[:, None] & (not dropping)       # [B, n] members of a coarse unit
    W, member = _coarse_weights(aggregate, s, sizes, grouped, c)     # [B, C, n] float64, bool
    n_keep = keep.sum(1)                                             # [B]
    N = int(units_out(valid, k, c, active).max())
    new_x = np.zeros((B, N, H), x.dtype)
    new_sizes = np.zeros((B, N), sizes.dtype)
    bi, ji = np.nonzero(keep)
    dest = np.cumsum(keep, 1)[bi, ji] - 1                            # slot of each kept unit
    new_x[bi, dest], new_sizes[bi, dest] = x[bi, ji], sizes[bi, ji]
    bc, gc = np.nonzero(np.arange(W.shape[1])[None] < c[:, None])    # coarse unit g of sequence b
    new_x[bc, n_keep[bc] + gc] = (W @ x)[bc, gc].astype(x.dtype)     # [B, C, n] @ [B, n, H] in float64
    new_sizes[bc, n_keep[bc] + gc] = (member @ sizes[:, :, None])[bc, gc, 0].astype(sizes.dtype)
    return new_x, new_sizes


def batchable(cfg):
    """Can `FCAState._reduce_batched` decide this layer? (Both rules registered with batched=True.)"""
    return score_facts(cfg.score).batched and aggregate_facts(cfg.aggregate).batched


def per_sequence(cfg, trace) -> bool:
    """Are a forward's FCA layers decided sequence by sequence (a trace, or a rule without batched facts)? Only
    those read the per-sequence seeds of the random rule."""
    return trace or not batchable(cfg)


def _select_batched(s, valid, k):
    """`select` on every row: s [B, n] scores, valid [B, n], k [B] -> fine [B, n] bool."""
    B, n = s.shape
    first = np.argmax(valid, 1)                                      # [B] [CLS] = the first valid unit
    cls = np.arange(n)[None] == first[:, None]                       # [B, n]
    candidate = valid & ~cls
    order = np.lexsort((np.arange(n)[None].repeat(B, 0), -s, ~candidate), axis=-1)  # [B, n] candidates best first, earlier on ties
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[None].repeat(B, 0), axis=1)  # [B, n] place of each unit
    return valid & (cls | (candidate & (rank < (k - 1)[:, None])))


def _coarse_weights(aggregate, s, sizes, grouped, c):
    """A batched aggregation rule on every row: W [B, C, n] float64 weights, member [B, C, n] bool.

    grouped [B, n]: the units of U that join a coarse unit (in sequence order), c [B] coarse units
    per row; clusters cuts U into c contiguous chunks as np.array_split does.
    """
    B, n = grouped.shape
    C = int(c.max()) if B else 0
    bi, ji = np.nonzero(grouped)                                     # [M] members, row by row in order
    r = np.cumsum(grouped, 1)[bi, ji] - 1                            # [M] place in U
    m, cb = grouped.sum(1)[bi], np.maximum(c[bi], 1)                 # [M]
    q, big = m // cb, m % cb                                         # chunk length; chunks one longer
    g = np.where(r < big * (q + 1), r // (q + 1), big + (r - big * (q + 1)) // np.maximum(q, 1))  # [M]
    gid = bi * C + g                                                 # [M] coarse unit over the batch
    if aggregate_facts(aggregate).weights == "sizes":             # size-weighted, as `mean`
        total = np.zeros(B * C, sizes.dtype)
        np.add.at(total, gid, sizes[bi, ji])
        w = (sizes[bi, ji] / total[gid]).astype(np.float64)          # [M]
    else:                                                            # softmax in each group, as `weighted`, `clusters`
        w = _softmax_in_groups(gid, s[bi, ji]) if len(gid) else np.zeros(0)
    W = np.zeros((B, C, n))
    W[bi, g, ji] = w
    member = np.zeros((B, C, n), bool)
    member[bi, g, ji] = True
    return W, member


def _describe(M, S, n_fine):
    """Units of one sequence as [{kind, tokens, weights, size}]: M [n, L] weights, S [n, L] membership.

    tokens are input positions; weights[i] is tokens[i]'s weight in the unit (its share of the
    unit's vector, composed through earlier merges; they sum to 1); size = len(tokens).
    """
    units = []
    for u, (row, member) in enumerate(zip(M, S)):
        tok = np.flatnonzero(member > 0)
        units.append({"kind": "fine" if u < n_fine else "coarse", "tokens": tok.tolist(),
                      "weights": [round(float(v), 6) for v in row[tok]], "size": len(tok)})
    return units


def sequence_seeds(ids, mask):
    """A seed per sequence from its own tokens, so `random` gives the same alone or in a batch."""
    return np.array([zlib.crc32(np.ascontiguousarray(i[m > 0], dtype=np.int64).tobytes()) for i, m in zip(ids, mask)],
                    dtype=np.int64)
