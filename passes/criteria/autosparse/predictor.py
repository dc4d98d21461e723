"""AutoSparse predictor: a per-weight MLP, features (w0, g0, w0*g0, layer shape) -> survival fraction.

Features of weight i in layer l (``FEATURES``): the init value ``w``, the init gradient ``g``
(mean cross-entropy on a prune batch), their product ``wg``, their absolute values, and the
layer-level ``log_fan_in``, ``log_fan_out``, ``log_numel``, ``is_conv``. With
``standardize="layer"`` each per-weight signal s is divided by its layer's RMS,
s / sqrt(mean_l(s^2)), so the scale of a layer's init and of a dataset's gradients drops out
and a predictor transfers across architectures; ``"none"`` keeps the raw values (the paper's
setting). The columns are then z-scored with the training set's mean/std (stored), and an MLP
(Linear-ReLU x k, Linear, sigmoid) predicts the fraction of iterative-pruning rounds the weight
survived, trained with MSE and Adam. Inference is numpy only; the file is a plain ``.npz``
(weights, feature spec, standardisation, JSON metadata), read with ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pai_compiler.errors import UsageError

__all__ = [
    "FEATURES", "GRADIENT_FEATURES", "DEFAULT_FEATURES", "FORMAT", "LayerInfo", "Predictor",
    "layer_features", "default_predictor_path", "load_predictor",
]

FORMAT = "paic-autosparse-predictor/1"
FEATURES: dict[str, str] = {
    "w": "init weight", "g": "init gradient", "wg": "init weight x init gradient",
    "abs_w": "|w|", "abs_g": "|g|", "abs_wg": "|w x g|",
    "log_fan_in": "log(fan-in)", "log_fan_out": "log(fan-out)", "log_numel": "log(layer size)",
    "is_conv": "1 for a convolution, 0 otherwise",
}
GRADIENT_FEATURES = frozenset({"g", "wg", "abs_g", "abs_wg"})
DEFAULT_FEATURES = ("w", "g", "wg", "abs_w", "abs_g", "abs_wg", "log_numel")
STANDARDIZE = ("layer", "none")


@dataclass(frozen=True)
class LayerInfo:
    """A prunable weight tensor: its name, op kind ('conv', 'linear', ...), shape and fans."""

    name: str
    kind: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    @classmethod
    def from_shape(cls, name: str, kind: str, shape: Sequence[int], out_axis: int = 0, in_axis: int | None = 1) -> LayerInfo:
        shape = tuple(int(d) for d in shape)
        numel = max(1, math.prod(shape))
        fan_in = numel // max(1, shape[out_axis]) if shape else 1
        fan_out = numel // max(1, shape[in_axis]) if in_axis is not None and len(shape) > 1 else numel
        return cls(name, kind, shape, int(fan_in), int(fan_out))


def _layer_rms(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return rms if rms > 0 and math.isfinite(rms) else 1.0


def layer_features(features: Sequence[str], w: np.ndarray, g: np.ndarray | None, info: LayerInfo, standardize: str) -> np.ndarray:
    """The (numel, len(features)) float32 feature matrix of one layer (flat weights in C order)."""
    w = np.asarray(w, dtype=np.float64).reshape(-1)
    needs_g = any(f in GRADIENT_FEATURES for f in features)
    if needs_g and g is None:
        raise UsageError(f"features {', '.join(f for f in features if f in GRADIENT_FEATURES)} need the init gradient")
    signals: dict[str, np.ndarray] = {"w": w}
    if needs_g:
        g64 = np.asarray(g, dtype=np.float64).reshape(-1)
        signals["g"], signals["wg"] = g64, w * g64
    if standardize == "layer":
        signals = {k: v / _layer_rms(v) for k, v in signals.items()}
    elif standardize != "none":
        raise UsageError(f"standardize must be one of {', '.join(STANDARDIZE)}, got {standardize!r}")
    constants = {
        "log_fan_in": math.log(max(1, info.fan_in)), "log_fan_out": math.log(max(1, info.fan_out)),
        "log_numel": math.log(max(1, info.numel)), "is_conv": 1.0 if info.kind == "conv" else 0.0,
    }
    out = np.empty((w.size, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        if name in signals:
            out[:, j] = signals[name]
        elif name.startswith("abs_") and name[4:] in signals:
            out[:, j] = np.abs(signals[name[4:]])
        elif name in constants:
            out[:, j] = constants[name]
        else:
            raise UsageError(f"unknown AutoSparse feature {name!r} (known: {', '.join(FEATURES)})")
    return out


@dataclass
class Predictor:
    """An MLP over per-weight features; ``predict`` runs in numpy."""

    features: tuple[str, ...]
    standardize: str
    mean: np.ndarray
    std: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W [out, in], b [out]) per Linear
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise UsageError(f"predictor: unknown feature(s) {', '.join(unknown)} (known: {', '.join(FEATURES)})")
        if self.standardize not in STANDARDIZE:
            raise UsageError(f"predictor: standardize must be one of {', '.join(STANDARDIZE)}, got {self.standardize!r}")
        width = len(self.features)
        for i, (weight, bias) in enumerate(self.layers):
            if weight.ndim != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
                raise UsageError(f"predictor: layer {i} has shape {weight.shape}/{bias.shape}, expected (*, {width})/(*,)")
            width = weight.shape[0]
        if width != 1 or self.mean.shape != (len(self.features),) or self.std.shape != (len(self.features),):
            raise UsageError("predictor: inconsistent shapes (the last layer must have one output; mean/std one per feature)")

    @property
    def needs_gradient(self) -> bool:
        return any(f in GRADIENT_FEATURES for f in self.features)

    @property
    def num_parameters(self) -> int:
        return int(sum(w.size + b.size for w, b in self.layers))

    def predict(self, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Predicted survival fraction in (0, 1) for each row of the feature matrix ``x``."""
        out = np.empty(x.shape[0], dtype=np.float64)
        mean, std = self.mean.astype(np.float32), self.std.astype(np.float32)
        for start in range(0, x.shape[0], chunk):
            h = (np.asarray(x[start : start + chunk], dtype=np.float32) - mean) / std
            for i, (weight, bias) in enumerate(self.layers):
                h = h @ weight.T + bias
                if i < len(self.layers) - 1:
                    np.maximum(h, 0, out=h)
            out[start : start + chunk] = 1.0 / (1.0 + np.exp(-h[:, 0].astype(np.float64)))
        return out

    def score(self, w: np.ndarray, g: np.ndarray | None, info: LayerInfo) -> np.ndarray:
        """Predicted survival fraction of every weight of one layer, shaped like ``w``."""
        return self.predict(layer_features(self.features, w, g, info, self.standardize)).reshape(np.shape(w))

    def save(self, path: str | os.PathLike[str]) -> None:
        from pai_compiler.io import save_npz_atomic

        arrays: dict[str, np.ndarray] = {
            "format": np.array(FORMAT), "features": np.array(self.features, dtype=str), "standardize": np.array(self.standardize),
            "mean": self.mean.astype(np.float32), "std": self.std.astype(np.float32), "num_layers": np.array(len(self.layers)),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        for i, (weight, bias) in enumerate(self.layers):
            arrays[f"weight_{i}"], arrays[f"bias_{i}"] = weight.astype(np.float32), bias.astype(np.float32)
        save_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Predictor:
        from pai_compiler.io import open_npz

        hint = "train one with `paic autosparse train`, or use predictor=default"
        with open_npz(path, fmt=FORMAT, what="AutoSparse predictor", hint=hint) as z:
            layers = [(z[f"weight_{i}"].astype(np.float32), z[f"bias_{i}"].astype(np.float32)) for i in range(int(z["num_layers"]))]
            return cls(tuple(str(f) for f in z["features"]), str(z["standardize"]), z["mean"].astype(np.float32),
                       z["std"].astype(np.float32), layers, json.loads(str(z["meta"])))


def default_predictor_path() -> Path:
    """The predictor shipped as package data (LeNet-5 / MNIST iterative magnitude pruning)."""
    from importlib.resources import files

    return Path(str(files("pai_compiler.passes.criteria.autosparse").joinpath("default_predictor.npz")))


def load_predictor(spec: str | os.PathLike[str]) -> Predictor:
    """``"default"`` (the shipped package data) or a path to a predictor ``.npz``."""
    return Predictor.load(default_predictor_path() if str(spec) == "default" else spec)


# ---- training -----------------------------------------------------------------------------------
SPLITS = ("auto", "layer", "file")


def split_groups(labelsets: Sequence[Any], split: str = "auto") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, held-out) lists of (file index, layer index): whole layers or whole files, never shared.

    ``file``: the last labels file is held out (needs two or more). ``layer``: in every file,
    layers 1, 5, 9, ... (every fourth, from the second) are held out. ``auto``: ``file`` when
    there are several files, else ``layer``.
    """
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "auto":
        split = "file" if len(labelsets) > 1 else "layer"
    groups = [(f, l) for f, ls in enumerate(labelsets) for l in range(len(ls.layers))]
    if split == "file":
        if len(labelsets) < 2:
            raise UsageError("--split file needs two or more labels files")
        held = [g for g in groups if g[0] == len(labelsets) - 1]
    else:
        if any(len(ls.layers) < 2 for ls in labelsets):
            raise UsageError("--split layer needs two or more layers per labels file")
        held = [g for g in groups if g[1] % 4 == 1]
    held_set = set(held)
    return [g for g in groups if g not in held_set], held


def _group_data(ls: Any, layer: int, features: Sequence[str], standardize: str) -> tuple[np.ndarray, np.ndarray]:
    start = int(ls.offsets[layer])
    info = ls.layers[layer]
    end = start + info.numel
    x = layer_features(features, ls.w0[start:end], ls.g0[start:end] if any(f in GRADIENT_FEATURES for f in features) else None, info, standardize)
    return x, ls.label()[start:end]


def _gather(labelsets: Sequence[Any], groups: Sequence[tuple[int, int]], features: Sequence[str], standardize: str,
            max_per_layer: int | None, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f, l in groups:
        x, y = _group_data(labelsets[f], l, features, standardize)
        if max_per_layer is not None and rng is not None and x.shape[0] > max_per_layer:
            pick = np.sort(rng.choice(x.shape[0], size=max_per_layer, replace=False))
            x, y = x[pick], y[pick]
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    return ranks


def evaluate_predictor(predictor: Predictor, labelsets: Sequence[Any], groups: Sequence[tuple[int, int]], baseline: float) -> dict[str, Any]:
    """Held-out errors: MSE/MAE of the survival fraction, a constant baseline, Spearman rho, top-k recall."""
    x, y = _gather(labelsets, groups, predictor.features, predictor.standardize, None, None)
    pred = predictor.predict(x)
    rho = float(np.corrcoef(_ranks(pred), _ranks(y))[0, 1]) if y.size > 1 and y.std() > 0 and pred.std() > 0 else float("nan")
    best = y >= y.max() if y.size else y.astype(bool)
    top = np.argsort(-pred, kind="stable")[: int(best.sum())]
    layers = []
    for f, l in groups:
        gx, gy = _group_data(labelsets[f], l, predictor.features, predictor.standardize)
        layers.append({"file": f, "layer": labelsets[f].layers[l].name, "label_mean": float(gy.mean()), "pred_mean": float(predictor.predict(gx).mean())})
    return {
        "weights": int(y.size), "mse": float(np.mean((pred - y) ** 2)), "mae": float(np.mean(np.abs(pred - y))),
        "baseline_mse": float(np.mean((baseline - y) ** 2)), "spearman": rho,
        "top_recall": float(best[top].mean()) if top.size else float("nan"), "layers": layers,
    }


def _fit_mlp(x: np.ndarray, y: np.ndarray, widths: Sequence[int], *, epochs: int, lr: float, batch_size: int, seed: int,
             on_epoch: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Adam + cosine schedule on the mean squared error of sigmoid(mlp(x)) vs y; the layers' (W, b)."""
    import torch  # heavy: torch loads only when a predictor is trained
    from torch import nn

    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        net = nn.Sequential(*mods, nn.Linear(widths[-1], 1))
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        generator = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            order = torch.randperm(xt.shape[0], generator=generator)
            total = 0.0
            for b in range(0, xt.shape[0], batch_size):
                idx = order[b : b + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = torch.mean((torch.sigmoid(net(xt[idx])[:, 0]) - yt[idx]) ** 2)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            schedule.step()
            if on_epoch is not None:
                on_epoch(epoch + 1, total / xt.shape[0])
    linears = [m for m in net if isinstance(m, nn.Linear)]
    return [(m.weight.detach().numpy().astype(np.float32).copy(), m.bias.detach().numpy().astype(np.float32).copy()) for m in linears]


def _sources_report(files: Sequence[str], labelsets: Sequence[Any]) -> list[dict[str, Any]]:
    """Each labels file's settings (model and data by file name only), rounds and history without timings."""
    out = []
    for name, ls in zip(files, labelsets):
        config = ls.meta.get("config", {})
        out.append({"file": name, "config": {k: v for k, v in config.items() if k not in ("model", "data")} | {
                        "model": Path(str(config.get("model", ""))).name, "data": Path(str(config.get("data", ""))).name},
                    "rounds_done": ls.rounds_done, "history": [{k: v for k, v in h.items() if k != "seconds"} for h in ls.meta.get("history", [])]})
    return out


def train_predictor(
    labelsets: Sequence[Any],
    *,
    features: Sequence[str] = DEFAULT_FEATURES,
    standardize: str = "layer",
    hidden: Sequence[int] = (32, 32),
    epochs: int = 20,
    lr: float = 3e-3,
    batch_size: int = 1024,
    max_per_layer: int | None = 50_000,
    split: str = "auto",
    seed: int = 0,
    sources: Sequence[str] = (),
    on_epoch: Any = None,
) -> tuple[Predictor, dict[str, Any]]:
    """Fit the MLP on the training groups and report its error on the held-out groups."""
    features = tuple(features)
    Predictor(features, standardize, np.zeros(len(features), np.float32), np.ones(len(features), np.float32),
              [(np.zeros((1, len(features)), np.float32), np.zeros(1, np.float32))])  # validates the spec early
    if epochs < 1 or batch_size < 1 or lr <= 0 or any(h < 1 for h in hidden):
        raise UsageError("--epochs, --batch-size, --hidden and --lr must be positive")
    start = time.perf_counter()
    train_groups, held_groups = split_groups(labelsets, split)
    rng = np.random.default_rng(seed)
    x, y = _gather(labelsets, train_groups, features, standardize, max_per_layer, rng)
    mean = x.mean(0).astype(np.float32)
    std = x.std(0).astype(np.float32)
    std[~(std > 1e-8)] = 1.0  # constant columns (a layer feature over one layer) pass through as 0
    layers = _fit_mlp((x - mean) / std, y, [len(features), *hidden], epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, on_epoch=on_epoch)
    predictor = Predictor(features, standardize, mean, std, layers)
    baseline = float(y.mean())
    split_name = "file" if split == "auto" and len(labelsets) > 1 else ("layer" if split == "auto" else split)
    held = evaluate_predictor(predictor, labelsets, held_groups, baseline)
    train_fit = evaluate_predictor(predictor, labelsets, train_groups, baseline)
    files = [Path(str(src)).name for src in sources] if len(sources) == len(labelsets) else [str(f) for f in range(len(labelsets))]
    names = lambda groups: [f"{files[f]}:{labelsets[f].layers[l].name}" for f, l in groups]  # noqa: E731
    report = {
        "split": split_name, "train_groups": names(train_groups), "heldout_groups": names(held_groups),
        "train_samples": int(y.size), "heldout": held, "train": {k: v for k, v in train_fit.items() if k != "layers"},
        "settings": {"features": list(features), "standardize": standardize, "hidden": list(hidden), "epochs": epochs, "lr": lr,
                     "batch_size": batch_size, "max_per_layer": max_per_layer, "seed": seed},
        "sources": _sources_report(files, labelsets),
    }
    predictor.meta = report  # no timings or absolute paths: the same labels give the same file, byte for byte
    return predictor, report | {"seconds": round(time.perf_counter() - start, 2)}
