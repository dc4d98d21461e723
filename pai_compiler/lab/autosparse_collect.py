"""AutoSparse labels by iterative rewind pruning: label_i = rounds weight i survived (0..R).

Round r = 1..R (lottery-ticket order): train the masked model for ``epochs`` (SGD, momentum,
weight decay, masked gradients and weights), remove floor(P * n_alive) of the surviving
conv/linear weights with the lowest score (global |w| of the trained weights, or SNIP
|w * dL/dw| on the prune batch), rewind the whole model (weights, biases, norms) to its
init state and add 1 to every survivor's count. Survivors after round r: n_r = n_{r-1} -
floor(P * n_{r-1}), ties broken towards the lower flat index. Before round 1 the init
weights w0 and the init gradient g0 (mean cross-entropy over the ``samples``-per-class prune
batch, eval mode: the same batch ``paic optimize --data`` gives a criterion) are recorded.

The labels file (``.npz``, no pickles) is rewritten atomically after every round and is
the checkpoint: ``resume=True`` checks that the settings and w0 match and continues (also to
more rounds than first asked). Each round's data order comes from its own seeded
generator, so a resumed run is bit-identical to an uninterrupted one (single-threaded CPU).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler._version import __version__
from pai_compiler.errors import UsageError
from pai_compiler.frontends.torch.spec import load_torch_module
from pai_compiler.io import open_npz, save_npz_atomic
from pai_compiler.lab import zoo
from pai_compiler.lab.data import load_prune_batch
from pai_compiler.passes.criteria.autosparse.predictor import LayerInfo
from pai_compiler.passes.criteria.base import topk_mask
from pai_compiler.progress import progress_bar

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["CollectConfig", "LabelSet", "collect", "build_model", "prunable_layers", "LABELS_FORMAT"]

LABELS_FORMAT = "paic-autosparse-labels/1"
PRUNE_BY = ("magnitude", "snip")
# settings that must match for --resume (rounds may grow, the device may change)
_RESUME_KEYS = ("model", "data", "rate", "epochs", "prune_by", "seed", "lr", "momentum", "weight_decay", "batch_size", "limit", "samples")


@dataclass(frozen=True)
class CollectConfig:
    """Settings of one iterative-pruning run (``paic autosparse collect`` flags)."""

    model: str
    data: str
    rounds: int
    rate: float
    epochs: int = 1
    prune_by: str = "magnitude"
    seed: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    limit: int | None = None  # first N training samples
    limit_test: int | None = None
    samples: int = 10  # per class, for g0 (and SNIP scores)
    device: str = "cpu"

    def check(self) -> None:
        if self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1, got {self.rounds}")
        if not 0.0 < self.rate < 1.0:
            raise UsageError(f"--rate must be in (0, 1), got {self.rate}")
        if self.epochs < 1 or self.batch_size < 1 or self.samples < 1:
            raise UsageError("--epochs, --batch-size and --samples must be positive")
        if self.prune_by not in PRUNE_BY:
            raise UsageError(f"--prune-by must be one of {', '.join(PRUNE_BY)}, got {self.prune_by!r}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")


@dataclass
class LabelSet:
    """Per-weight w0, g0, rounds survived and layer id, plus per-layer metadata and the run's settings."""

    w0: np.ndarray  # float32 [N], all prunable weights flattened layer by layer
    g0: np.ndarray  # float32 [N]
    survived: np.ndarray  # int16 [N]
    layer: np.ndarray  # int32 [N]
    layers: list[LayerInfo]
    rounds_done: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([info.numel for info in self.layers])]).astype(np.int64)

    def label(self) -> np.ndarray:
        """Survival fraction in [0, 1]: rounds survived / rounds done."""
        return self.survived.astype(np.float64) / max(1, self.rounds_done)

    def save(self, path: str | os.PathLike[str]) -> None:
        arrays = {
            "format": np.array(LABELS_FORMAT), "w0": self.w0, "g0": self.g0, "survived": self.survived, "layer": self.layer,
            "rounds_done": np.array(self.rounds_done),
            "layer_names": np.array([i.name for i in self.layers], dtype=str), "layer_kinds": np.array([i.kind for i in self.layers], dtype=str),
            "layer_shapes": np.array(["x".join(map(str, i.shape)) for i in self.layers], dtype=str),
            "layer_fan_in": np.array([i.fan_in for i in self.layers], dtype=np.int64),
            "layer_fan_out": np.array([i.fan_out for i in self.layers], dtype=np.int64),
            "layer_numel": np.array([i.numel for i in self.layers], dtype=np.int64), "layer_offset": self.offsets[:-1],
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        save_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LabelSet:
        with open_npz(path, fmt=LABELS_FORMAT, what="AutoSparse labels file", hint="write one with `paic autosparse collect`") as z:
            layers = [LayerInfo(str(n), str(k), tuple(int(d) for d in str(s).split("x")), int(fi), int(fo))
                      for n, k, s, fi, fo in zip(z["layer_names"], z["layer_kinds"], z["layer_shapes"], z["layer_fan_in"], z["layer_fan_out"])]
            return cls(z["w0"], z["g0"], z["survived"], z["layer"], layers, int(z["rounds_done"]), json.loads(str(z["meta"])))


def build_model(spec: str, seed: int) -> nn.Module:
    """``zoo:NAME`` (or a bare zoo name) seeded with ``seed``, or a ``file.py:attr`` spec (paic's own seed 0)."""
    import torch

    name = spec[4:] if spec.startswith("zoo:") else spec
    if spec.startswith("zoo:") or (name in zoo.MODELS and not Path(spec).exists()):
        if name not in zoo.MODELS:
            raise UsageError(f"unknown zoo model {name!r}; known: {', '.join(sorted(zoo.MODELS))}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return zoo.build(name)
    if ":" not in spec:
        raise UsageError(f"MODEL must be zoo:NAME or file.py:attr, got {spec!r}")
    return load_torch_module(spec)


def prunable_layers(model: nn.Module) -> list[tuple[LayerInfo, torch.Tensor]]:
    """Conv and linear weights (biases and norms are not pruned), in module order."""
    from torch import nn

    out = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            name = f"{module_name}.weight" if module_name else "weight"
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            out.append((LayerInfo.from_shape(name, kind, tuple(module.weight.shape)), module.weight))
    if not out:
        raise UsageError("the model has no conv/linear weights to prune")
    return out


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().cpu().reshape(-1).numpy() for t in tensors]).astype(np.float32)


def _prune_gradients(model: nn.Module, weights: list[torch.Tensor], batch: Any, device: torch.device, chunk: int = 256) -> list[torch.Tensor]:
    """dL/dw summed over the prune batch in chunks of ``chunk`` (mean cross-entropy per chunk), eval mode."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for start in range(0, len(batch), chunk):
        x = torch.as_tensor(batch.x[start : start + chunk], device=device)
        y = torch.as_tensor(batch.y[start : start + chunk], device=device)
        F.cross_entropy(model(x), y).backward()
    grads = [w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w) for w in weights]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return grads


def _train_round(model: nn.Module, weights: list[torch.Tensor], masks: list[torch.Tensor], data: Any, cfg: CollectConfig,
                 round_index: int, device: torch.device, advance: Callable[[float], None]) -> float:
    """Train the masked model for ``cfg.epochs``; returns the last epoch's mean loss."""
    import torch  # heavy: torch (and the training module, which imports it) load only when training
    import torch.nn.functional as F

    from pai_compiler.lab.training import prepare_batch

    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, round_index]).generate_state(1)[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(data.y_train)
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        loss_sum, seen = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = prepare_batch(data.x_train[idx], data, device, data.augment, generator)
            y = data.y_train[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                for w, m in zip(weights, masks):
                    if w.grad is not None:
                        w.grad.mul_(m)
            optimizer.step()
            with torch.no_grad():
                for w, m in zip(weights, masks):
                    w.mul_(m)
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
            advance(loss_sum / seen)
    return loss_sum / max(1, seen)


def _survivors(scores: np.ndarray, alive: np.ndarray, rate: float) -> np.ndarray:
    """Keep n_alive - floor(rate * n_alive) of the alive weights with the highest scores."""
    n_alive = int(alive.sum())
    keep = n_alive - int(math.floor(rate * n_alive))
    return topk_mask(np.where(alive, scores.astype(np.float64), -np.inf), keep)


def _masks_of(alive: np.ndarray, weights: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The survivors as one mask per weight, already applied to the weights (zeroing the pruned ones)."""
    import torch  # heavy: loaded only when collecting

    sizes = [int(w.numel()) for w in weights]
    masks = [torch.as_tensor(m.reshape(w.shape), device=device).to(w.dtype) for m, w in zip(np.split(alive, np.cumsum(sizes)[:-1]), weights)]
    with torch.no_grad():
        for w, m in zip(weights, masks):
            w.mul_(m)
    return masks


def _start_labels(cfg: CollectConfig, out: Path, resume: bool, model: nn.Module, weights: list[torch.Tensor],
                  infos: list[LayerInfo], batch: Any, device: torch.device) -> LabelSet:
    """The labels file to continue (checked against ``cfg`` and the init weights), or a fresh one with w0 and g0."""
    w0 = _flat(weights)
    if resume and out.is_file():
        labels = LabelSet.load(out)
        mismatch = [k for k in _RESUME_KEYS if labels.meta.get("config", {}).get(k) != asdict(cfg)[k]]
        if mismatch:
            raise UsageError(f"--resume: {out} was collected with different settings ({', '.join(mismatch)}); use the same flags or a new -o")
        if not np.array_equal(labels.w0, w0):
            raise UsageError(f"--resume: the init weights of {cfg.model} (seed {cfg.seed}) differ from those stored in {out}")
        return labels
    if out.exists() and not resume:
        raise UsageError(f"{out} exists: pass --resume to continue it, or choose another -o")
    g0 = _flat(_prune_gradients(model, weights, batch, device))
    layer_ids = np.concatenate([np.full(info.numel, i, dtype=np.int32) for i, info in enumerate(infos)])
    return LabelSet(w0, g0, np.zeros(w0.size, dtype=np.int16), layer_ids, infos, 0, {"history": [], "seconds": 0.0})
@dataclass
class _Rounds:
    """What every pruning round of one :func:`collect` call shares, and the survivors so far."""

    cfg: CollectConfig
    out: Path
    model: nn.Module
    weights: list[torch.Tensor]
    init_state: dict[str, torch.Tensor]
    data: Any
    batch: Any
    device: torch.device
    labels: LabelSet
    alive: np.ndarray
    masks: list[torch.Tensor]


def _prune_round(rounds: _Rounds, r: int, advance: Callable[[float], None]) -> dict[str, Any]:
    """Train, score, prune, rewind and save round ``r``; returns its history row."""
    from pai_compiler.lab.training import evaluate  # heavy: imports torch

    cfg, model, weights, device = rounds.cfg, rounds.model, rounds.weights, rounds.device
    start = time.perf_counter()
    density = float(rounds.alive.mean())
    loss = _train_round(model, weights, rounds.masks, rounds.data, cfg, r, device, advance)
    accuracy = evaluate(model, rounds.data, device)
    if cfg.prune_by == "snip":
        scores = _flat([(g * w).abs() for g, w in zip(_prune_gradients(model, weights, rounds.batch, device), weights)])
    else:
        scores = np.abs(_flat(weights))
    rounds.alive = _survivors(scores, rounds.alive, cfg.rate)
    rounds.labels.survived[rounds.alive] += 1
    rounds.labels.rounds_done = r
    model.load_state_dict(rounds.init_state)  # rewind everything to init, then mask
    rounds.masks = _masks_of(rounds.alive, weights, device)
    seconds = time.perf_counter() - start
    row = {"round": r, "trained_density": density, "test_accuracy": accuracy, "train_loss": loss,
           "density_after": float(rounds.alive.mean()), "seconds": round(seconds, 2)}
    meta = rounds.labels.meta
    meta["history"] = [h for h in meta["history"] if h["round"] < r] + [row]
    meta["seconds"] = round(float(meta.get("seconds", 0.0)) + seconds, 2)
    rounds.labels.save(rounds.out)
    return row


def _setup(cfg: CollectConfig, out: Path, resume: bool) -> _Rounds:
    """Build the seeded model, load the data and the labels to continue, mask the current survivors."""
    import torch  # heavy: loaded only when collecting

    from pai_compiler.lab.training import load_dataset  # heavy: imports torch

    cfg.check()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but torch sees no CUDA device")
    model = build_model(cfg.model, cfg.seed).to(device)
    layers = prunable_layers(model)
    infos, weights = [info for info, _ in layers], [w for _, w in layers]
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = load_dataset(cfg.data, limit_train=cfg.limit, limit_test=cfg.limit_test)
    batch = load_prune_batch(cfg.data, samples_per_class=cfg.samples, seed=cfg.seed, input_shape=data.input_shape)
    labels = _start_labels(cfg, out, resume, model, weights, infos, batch, device)
    labels.meta.update(config=asdict(cfg) | {"rounds": max(cfg.rounds, labels.rounds_done)}, paic_version=__version__, input_shape=list(data.input_shape))
    alive = labels.survived == labels.rounds_done
    return _Rounds(cfg, out, model, weights, init_state, data, batch, device, labels, alive, _masks_of(alive, weights, device))


def collect(cfg: CollectConfig, out: str | os.PathLike[str], *, resume: bool = False, progress: bool = True, console: Any = None,
            on_round: Callable[[int, nn.Module, LabelSet], None] | None = None) -> LabelSet:
    """Run (or continue) iterative rewind pruning and write the labels file after every round."""
    rounds = _setup(cfg, Path(out), resume)
    todo = list(range(rounds.labels.rounds_done + 1, cfg.rounds + 1))
    steps = cfg.epochs * math.ceil(len(rounds.data.y_train) / cfg.batch_size)
    bar = progress_bar(progress, console)
    with bar:
        task = bar.add_task("iterative pruning", total=len(todo) * steps) if progress else None
        for r in todo:
            density = float(rounds.alive.mean())

            def advance(loss: float, r: int = r, density: float = density) -> None:
                if task is not None:
                    bar.update(task, advance=1, description=f"round {r}/{cfg.rounds} density {100 * density:.2f}% loss {loss:.3f}")

            row = _prune_round(rounds, r, advance)
            if progress and console is not None:
                console.print(f"round {r}/{cfg.rounds}: density {100 * density:.2f}% -> test {100 * row['test_accuracy']:.2f}%; "
                              f"kept {100 * row['density_after']:.2f}% ({row['seconds']:.0f} s)")
            if on_round is not None:
                on_round(r, rounds.model, rounds.labels)
    if not todo:
        rounds.labels.save(rounds.out)
    return rounds.labels
