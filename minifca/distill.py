"""`distill`: re-train a checkpoint with FCA in place (the paper's re-training stage), in NumPy, no torch.

The student is the checkpoint running FCA; the teacher the same checkpoint without FCA (or another one).

    labelled TSV (sentence<TAB>label, GLUE pairs)   loss = ce * cross-entropy + kl * T^2 KL(teacher || student)
    unlabelled text (one per line, or a TSV with a  a classifier: loss = kl * T^2 KL(teacher || student), the
    sentence/text column and no label)             teacher's logits as the only target (any text will do);
                                                    a sentence encoder: loss = 1 - cos(student, teacher) of the
                                                    pooled embeddings (or their MSE)

AdamW (minifca.optim) with linear warm-up and decay, global gradient clipping, gradient accumulation,
hidden and attention dropout; gradients from minifca.grad (with the Numba activations and fused AdamW of
minifca.kernels.cpu_grad, tested against the NumPy ones). The output folder is a Hugging Face
checkpoint (config.json, model.safetensors with the source's tensor names, the tokenizer files) plus
fca.json (the schedule) and training_state.safetensors (optimizer moments, step), so `resume=True`
continues exactly where an interrupted run stopped: each step's batch and dropout masks are drawn
from (seed, step) alone.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from . import grad
from .calibrate import calibrate
from .data import Dataset, Texts, read_training_data
from .errors import ConfigError, InputError
from .fca import FCAConfig
from .kernels import cpu_grad
from .model import from_pretrained
from .optim import AdamW, clip_grad_norm, linear_warmup_decay
from .progress import progress
from .weights import _canonical, find_weight_files, from_params, read_safetensors

STATE_FILE = "training_state.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", STATE_FILE)


def no_decay(name):
    """Biases and LayerNorm parameters get no weight decay (BERT's recipe)."""
    return name.endswith(".b") or "ln." in name                   # 'layers.0.attn.q.b', 'embeddings.ln.g', ...


class Batches:
    """The micro-batches of a run, from (seed, step) alone, of similar lengths (little padding).

    Epoch e shuffles the examples with seed (seed, e), sorts each window of 50 batches' worth by token count,
    cuts it into batches and shuffles the batches' order: micro-batch `step` is a fixed function of the seed.
    """
    WINDOW = 50

    def __init__(self, lengths, batch_size, seed):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.per_epoch = max(1, len(self.lengths) // batch_size)     # full batches only
        self._epoch, self._batches = None, None

    def __call__(self, step):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            order = order[:self.per_epoch * self.batch_size] if len(order) >= self.batch_size else order
            w = self.WINDOW * self.batch_size
            order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")]
                                    for c in np.split(order, range(w, len(order), w))])
            batches = np.split(order, range(self.batch_size, len(order), self.batch_size))
            shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
            self._epoch, self._batches = epoch, [batches[j] for j in shuffle]
        return self._batches[i]


def save_checkpoint(out, source, params, fca, opt=None, meta=None):
    """out: config.json, tokenizer files and the rest of the source folder, model.safetensors under the
    source's own tensor names (trained tensors replaced, others copied), fca.json, training state."""
    from safetensors.numpy import save_file
    out, source = Path(out), Path(source)
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():                                      # config, tokenizer, sentence-transformers files
        if f.name in WEIGHT_FILES or f.name.startswith("model-") or f.suffix in (".bin", ".pt", ".onnx", ".h5"):
            continue
        if f.is_file():
            shutil.copyfile(f, out / f.name)
        elif f.is_dir() and not (out / f.name).exists() and f.name not in ("onnx", "openvino"):
            shutil.copytree(f, out / f.name)
    trained = from_params(params)
    tensors = {}
    for file in find_weight_files(source):
        for raw, arr in read_safetensors(file).items():
            name = _canonical(raw)
            tensors[raw] = np.ascontiguousarray(trained.get(name, arr))
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})         # transformers reads "pt"-format files
    tmp.replace(out / "model.safetensors")
    if fca is not None:
        d = fca.to_dict()
        d["meta"] = meta or {}
        (out / "fca.json").write_text(json.dumps(d, indent=2) + "\n")
    if opt is not None:
        tmp = out / (STATE_FILE + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in opt.state().items()}, str(tmp))
        tmp.replace(out / STATE_FILE)


def load_state(out):
    from safetensors.numpy import load_file
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise InputError(f"{out}: nothing to resume ({STATE_FILE} not found)")
    return load_file(str(path))


def find_schedule(model, data: Texts, target, base=None, samples=512, seed=0, batch_size=64, log=print):
    """`calibrate` on a sample of the training data: agreement with the full model's predictions on labelled
    data; on unlabelled text, the cosine of each candidate's embeddings to the full model's."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(data), size=min(samples, len(data)), replace=False))
    texts = [data.texts[i] for i in idx]
    pairs = None if data.pairs is None else [data.pairs[i] for i in idx]
    sample = Dataset(texts, pairs, [0] * len(texts), f"{data.source} (calibration sample)")
    objective = "logits" if "classifier" in model.params else "embeddings"  # labels are not used: the full model is
    fca, best = calibrate(model, sample, target, base, batch_size=batch_size, objective=objective, log=log)
    return fca, {**best, "objective": objective, "samples": len(texts)}


def distill(model, data, out, fca=None, target_flops=None, base=None, teacher=None, steps=None, epochs=1.0, batch_size=32,
            accumulate=1, lr=5e-5, warmup=0.06, weight_decay=0.01, clip=1.0, dropout=0.1, seed=0, ce=1.0, kl=1.0,
            temperature=1.0, embedding_loss="cosine", max_length=128, resume=False, save_every=0,
            calibration_samples=512, progress_bar=None, log_every=60.0, log=print):
    """Train `model` (a folder) with FCA on `data` (a file) and write the result to `out`. Returns a summary.

    fca: an FCAConfig (or a schedule file), or None with target_flops to calibrate one first (with the rules
    of `base`, an FCAConfig whose keep is ignored). steps: optimizer
    steps (default: `epochs` passes over the data, batch_size * accumulate examples per step).
    Ctrl-C saves the last finished step (then exits with KeyboardInterrupt); resume=True continues from `out`.
    progress_bar: True, False, or None (a bar when stderr is a terminal); without a bar a line goes to `log`
    every `log_every` seconds (step, loss, examples/s, ETA), so a run written to a file shows where it is.
    """
    if isinstance(fca, (str, Path)):
        fca = FCAConfig.load(fca)
    if embedding_loss not in ("cosine", "mse"):
        raise ConfigError(f"embedding loss {embedding_loss!r} unknown; choose cosine or mse")
    out = Path(out)
    source = Path(model)
    start = from_pretrained(out if resume else source, backend="numba")
    if resume:
        state = load_state(out)
        if fca is None and (out / "fca.json").is_file():
            fca = FCAConfig.load(out / "fca.json")
        meta = json.loads((out / "fca.json").read_text()).get("meta", {}) if (out / "fca.json").is_file() else {}
        source = Path(meta.get("source", source))
    teacher_model = from_pretrained(teacher or source, backend="numba")
    cfg = start.config
    texts = read_training_data(data, cfg if "classifier" in start.params else None)
    labelled = texts.labels is not None
    logits = "classifier" in start.params                            # the target: the teacher's logits, else embeddings
    if logits and "classifier" not in teacher_model.params:
        raise ConfigError(f"{teacher or source}: the teacher has no classifier head, the student has one "
                          "(distill a classifier from a classifier)")
    calib = None
    if fca is None:
        if target_flops is None:
            raise ConfigError("distill needs an FCA schedule (--fca-schedule) or a FLOPs target (--target-flops)")
        log(f"calibrating a schedule at {target_flops} of the full model's FLOPs on {texts.source}")
        fca, calib = find_schedule(start, texts, target_flops, base, samples=calibration_samples, seed=seed, log=log)
    grad.check_trainable(fca)
    fca.check_layers(cfg.num_hidden_layers)
    max_length = min(max_length, cfg.max_position_embeddings)        # the default 128 on a shorter model

    params = grad.trainable(start.params)
    flat = dict(grad.leaves(params))
    opt = AdamW(flat, lr=lr, eps=1e-8, weight_decay=weight_decay, no_decay=[k for k in flat if no_decay(k)],
                update=cpu_grad.adamw_update)                        # fused (tested against optim.adamw_update)
    done = 0
    if resume:
        opt.load_state(state)
        done = opt.t
    per_step = batch_size * accumulate
    total = steps if steps is not None else max(1, math.ceil(epochs * len(texts) / per_step))
    warm = round(warmup * total) if warmup < 1 else int(warmup)
    meta = {"made_by": "minifca distill", "source": str(source), "teacher": str(teacher or source),
            "data": texts.source, "labelled": labelled, "target": "logits" if logits else "embeddings", "steps": total, "batch_size": batch_size,
            "accumulate": accumulate, "lr": lr, "warmup_steps": warm, "weight_decay": weight_decay, "clip": clip,
            "dropout": dropout, "seed": seed, "ce": ce, "kl": kl, "temperature": temperature,
            "embedding_loss": embedding_loss, "max_length": max_length, "calibration": calib}
    encodings = start.tokenizer.encode(texts.texts, texts.pairs, max_length=max_length, truncation=True)
    batches = Batches([len(e.ids) for e in encodings], batch_size, seed)
    history, t0, seen = [], time.perf_counter(), 0
    bar = progress(total, "distill", progress_bar, unit="step")
    bar.update(done)
    last_line = time.perf_counter()

    def save():
        meta["steps_done"] = opt.t
        save_checkpoint(out, source, params, fca, opt, meta)

    try:
        for step in range(done, total):
            grads, loss_sum = None, 0.0
            for micro in range(accumulate):
                idx = batches(step * accumulate + micro)
                enc = start.tokenizer.pad([encodings[i] for i in idx], tokens=False)
                labels = None if texts.labels is None else texts.labels[idx]
                loss, g = train_step(params, cfg, teacher_model, enc, labels, fca, dropout, seed, step, micro, ce, kl,
                                     temperature, embedding_loss, logits)
                g = dict(grad.leaves(g))
                if grads is None:
                    grads = g
                else:
                    for k in grads:
                        grads[k] += g[k]
                loss_sum += loss
            for k in grads:
                grads[k] /= np.float32(accumulate)
            norm = clip_grad_norm(grads, clip)
            opt.step(grads, lr=lr * linear_warmup_decay(step, total, warm))
            seen += per_step
            history.append({"step": step + 1, "loss": loss_sum / accumulate, "grad_norm": norm})
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss_sum / accumulate:.4f}", ex_s=f"{rate:.1f}")
            bar.update(1)
            if bar.disable and time.perf_counter() - last_line >= log_every:
                last_line = time.perf_counter()
                eta = (total - step - 1) * per_step / rate
                log(f"step {step + 1}/{total}: loss {loss_sum / accumulate:.4f}, {rate:.1f} examples/s, "
                    f"ETA {eta / 60:.1f} min")
            if save_every and (step + 1) % save_every == 0:
                save()
    except KeyboardInterrupt:
        bar.close()
        save()
        log(f"interrupted: saved step {opt.t} of {total} to {out}; continue with resume")
        raise
    bar.close()
    save()
    seconds = time.perf_counter() - t0
    return {"out": str(out), "steps": opt.t, "steps_run": len(history), "examples": seen, "seconds": seconds,
            "examples_per_s": seen / seconds if seconds else 0.0, "history": history, "fca": fca.to_dict(),
            "calibration": calib}


def train_step(params, cfg, teacher, enc, labels, fca, dropout, seed, step, micro, ce, kl, temperature,
               embedding_loss, logits=True):
    """One micro-batch (an Encoding, its labels or None): the loss and the gradients of every parameter.
    logits: the student is a classifier (the teacher's logits are the target), else its embeddings are."""
    t_out = teacher(enc)                                             # no FCA, no dropout
    rng = np.random.default_rng([seed, step, micro, 1])              # dropout masks from (seed, step) alone
    out, cache = grad.forward(params, cfg, enc.input_ids, enc.attention_mask, enc.token_type_ids, fca=fca,
                              dropout=dropout, rng=rng if dropout else None, ops=cpu_grad)  # Numba activations
    d_out = {}
    if logits:
        loss, d_logits = grad.kl_to_teacher(out["logits"], t_out.logits, temperature)
        loss, d_logits = kl * loss, kl * d_logits
        if labels is not None:
            loss_ce, d_ce = grad.cross_entropy(out["logits"], labels)
            loss, d_logits = loss + ce * loss_ce, d_logits + ce * d_ce
        d_out["logits"] = d_logits.astype(np.float32)
    else:
        fn = grad.cosine_to_teacher if embedding_loss == "cosine" else grad.mse_to_teacher
        loss, d_out["embeddings"] = fn(out["embeddings"], t_out.embeddings)
    g, _ = grad.backward(params, cfg, cache, d_out)
    return loss, g
