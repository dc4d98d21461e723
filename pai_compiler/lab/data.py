"""Prune batches for data-driven criteria: x = (u8/255 - mean_c) / std_c, class-balanced and seeded.

``load_prune_batch("cifar10.npz", samples_per_class=10, seed=0)`` reads ``x_train``/``y_train``
from an ``.npz`` archive, picks ``samples_per_class`` images of every class with
``numpy.random.default_rng(seed)`` (without replacement, per class in label order), converts
them to float32 NCHW (``NHWC``/``NHW`` layouts are recognised; integer pixels are divided by
255, float pixels are taken as they are) and normalises each channel by the mean and std of
the *whole* ``x_train`` array unless ``mean``/``std`` are given. ``"random"`` (only when asked
for) gives N(0, 1) inputs of ``input_shape`` with ``samples_per_class`` labels of every class
in a seeded random order. A model whose input only indexes embedding lookups gets integer
indices instead (``load_index_batch``: uniform in the table for ``"random"``, the file's
integers as they are). A model with several inputs gets a batch for each of the others too
(``Batch.more``, by input name): uniform indices below the smallest table an embedding input
picks rows of, all ones for an integer input that picks none (an attention mask), N(0, 1)
floats otherwise; a data file feeds only the first input, so only masks are filled in for it.
Every failure is a
one-line :class:`~pai_compiler.errors.UsageError` (bad file, missing key, shape mismatch).
"""
from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sympy

from pai_compiler.backends.index_inputs import InputRole, input_index_entries, input_roles, role_array
from pai_compiler.errors import UsageError
from pai_compiler.passes.analysis.bindings import sample_bindings

__all__ = ["Batch", "load_prune_batch", "load_batch_for", "load_index_batch", "other_inputs", "RANDOM_DATA"]

RANDOM_DATA = "random"


@dataclass(frozen=True)
class Batch:
    """A prune batch: inputs ``x`` (float32, N x C x ...; int64 embedding indices), labels ``y`` (int64, N) and provenance.

    ``more`` holds the model's other inputs by name (N rows each), in the graph's input order.
    """

    x: np.ndarray
    y: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    more: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UsageError(f"data file {path} not found (give an .npz with x_train/y_train, or --data random)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            missing = [k for k in ("x_train", "y_train") if k not in keys]
            if missing:
                raise UsageError(f"data file {path} has no {' or '.join(repr(k) for k in missing)} (keys: {', '.join(keys) or 'none'})")
            return np.asarray(archive["x_train"]), np.asarray(archive["y_train"])
    except UsageError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"cannot read data file {path} as .npz: {exc}") from None


_CACHE: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}
_STATS: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}


def _file_key(path: Path) -> tuple[str, int, int] | None:
    stat = path.stat() if path.is_file() else None
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size) if stat else None


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x_train, y_train), cached for the last file read (CIFAR-10 takes ~10 s to decompress)."""
    key = _file_key(path)
    if key is not None and key in _CACHE:
        return _CACHE[key]
    arrays = _read_npz(path)
    _CACHE.clear()
    _STATS.clear()
    if key is not None:
        _CACHE[key] = arrays
    return arrays


def _to_nchw(x: np.ndarray, input_shape: Sequence[int] | None, path: Path) -> np.ndarray:
    """Reorder a sample array to N x C x spatial, guided by the model's input shape when known."""
    sample = tuple(int(d) for d in x.shape[1:])
    if input_shape is None:
        if x.ndim == 3:
            return x[:, None]  # N x H x W (MNIST) -> N x 1 x H x W
        if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            return np.moveaxis(x, -1, 1)  # channels last -> channels first
        return x
    want = tuple(int(d) for d in input_shape)
    if sample == want:
        return x
    if len(sample) == len(want) >= 3 and sample == want[1:] + want[:1]:
        return np.moveaxis(x, -1, 1)  # channels last -> channels first
    if len(want) == len(sample) + 1 and want[0] == 1 and want[1:] == sample:
        return x[:, None]  # no channel axis in the file (MNIST)
    if math.prod(sample) == math.prod(want) and (len(want) == 1 or len(sample) == 1):
        return x.reshape(x.shape[0], *want)  # flattened inputs (MLPs) or flattened files
    raise UsageError(f"data file {path}: samples have shape {sample}, the model expects {want}")


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of N x C x ... pixels scaled to [0, 1] (exact, via a histogram for uint8)."""
    channels = _channels(x)
    mean = np.empty(channels)
    std = np.empty(channels)
    for c in range(channels):
        values = x[:, c] if x.ndim >= 3 else x
        if values.dtype == np.uint8:
            counts = np.bincount(values.reshape(-1), minlength=256).astype(np.float64)
            levels = np.arange(256) / 255.0
            total = counts.sum()
            mean[c] = float(counts @ levels) / total
            std[c] = math.sqrt(max(float(counts @ (levels - mean[c]) ** 2) / total, 0.0))
        else:
            scaled = _scale(values).astype(np.float64)
            mean[c], std[c] = float(scaled.mean()), float(scaled.std())
    std[std == 0] = 1.0
    return mean, std


def _channels(x: np.ndarray) -> int:
    """Channel count of N x C x spatial data; flat N x F data counts as one channel."""
    return int(x.shape[1]) if x.ndim >= 3 else 1


def _scale(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def _balanced_indices(y: np.ndarray, samples_per_class: int, seed: int, path: Path) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(y):
        pool = np.flatnonzero(y == label)
        if pool.size < samples_per_class:
            raise UsageError(f"data file {path}: class {label} has {pool.size} samples, fewer than --samples {samples_per_class}")
        chosen.append(rng.choice(pool, size=samples_per_class, replace=False))
    return np.concatenate(chosen)


def _per_channel(values: Sequence[float] | float | None, channels: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if array.size == 1:
        array = np.full(channels, float(array[0]))
    if array.size != channels:
        raise UsageError(f"{what} has {array.size} values, the data has {channels} channel(s)")
    return array


def load_prune_batch(
    source: str | os.PathLike[str],
    *,
    samples_per_class: int = 10,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> Batch:
    """Load a class-balanced prune batch from an ``.npz`` file (or ``"random"``).

    ``input_shape`` is the model's input without the batch axis; when given, the samples are
    checked (and reordered from channels-last) against it. ``num_classes`` (the model's output
    width) is needed for ``"random"`` and checked against the labels otherwise.
    """
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise UsageError(f"--samples must be a positive integer, got {samples_per_class!r}")
    if str(source) == RANDOM_DATA:
        return _random_batch(samples_per_class, seed, input_shape, num_classes)
    path = Path(source)
    x_all, y_all = _load_arrays(path)
    if x_all.ndim < 2 or y_all.ndim != 1 or x_all.shape[0] != y_all.shape[0]:
        raise UsageError(f"data file {path}: x_train {x_all.shape} and y_train {y_all.shape} do not match (need N x ... and N)")
    if not np.issubdtype(y_all.dtype, np.integer):
        raise UsageError(f"data file {path}: y_train must hold integer class labels, got {y_all.dtype}")
    if num_classes is not None and (y_all.min() < 0 or y_all.max() >= num_classes):
        raise UsageError(f"data file {path}: labels run {y_all.min()}..{y_all.max()}, the model has {num_classes} outputs")
    x_all = _to_nchw(x_all, input_shape, path)
    index = _balanced_indices(y_all, samples_per_class, seed, path)
    channels = _channels(x_all)
    mean_c, std_c = _per_channel(mean, channels, "mean"), _per_channel(std, channels, "std")
    if mean_c is None or std_c is None:
        stats_key = (_file_key(path), x_all.shape)
        if stats_key not in _STATS:
            _STATS[stats_key] = _channel_stats(x_all)
        data_mean, data_std = _STATS[stats_key]
        mean_c = data_mean if mean_c is None else mean_c
        std_c = data_std if std_c is None else std_c
    x = _scale(x_all[index])
    shape = [1, -1] + [1] * (x.ndim - 2) if x.ndim >= 3 else [1, 1]
    x = ((x - mean_c.reshape(shape).astype(np.float32)) / std_c.reshape(shape).astype(np.float32)).astype(np.float32)
    y = y_all[index].astype(np.int64)
    meta = {
        "source": str(path), "samples_per_class": samples_per_class, "seed": seed, "classes": int(np.unique(y).size),
        "mean": [float(v) for v in mean_c], "std": [float(v) for v in std_c],
    }
    return Batch(np.ascontiguousarray(x), y, meta)


def _random_batch(samples_per_class: int, seed: int, input_shape: Sequence[int] | None, num_classes: int | None) -> Batch:
    if input_shape is None or num_classes is None:
        raise UsageError("--data random needs the model's input shape and number of classes")
    rng = np.random.default_rng(seed)
    n = samples_per_class * int(num_classes)
    x = rng.standard_normal((n, *[int(d) for d in input_shape])).astype(np.float32)
    y = rng.permutation(np.repeat(np.arange(int(num_classes), dtype=np.int64), samples_per_class))
    meta = {"source": RANDOM_DATA, "samples_per_class": samples_per_class, "seed": seed, "classes": int(num_classes)}
    return Batch(x, y, meta)


def load_batch_for(graph: Any, source: str | os.PathLike[str], *, samples_per_class: int = 10, seed: int = 0,
                   bind: Mapping[str, int] | None = None) -> Batch:
    """:func:`load_prune_batch` checked against an IR graph's first input and output shapes.

    A symbolic size of the input other than the batch (a sequence length) takes its value
    from ``bind`` (default 1, as everywhere a symbol is unbound).

    A model whose first input is integer and only indexes embedding lookups gets an index
    batch instead (:func:`load_index_batch`); the graph's other inputs are filled in by role
    (:func:`other_inputs`).
    """
    inputs, outputs = graph.inputs, graph.outputs
    sizes = {sympy.Symbol(k, integer=True, positive=True): v for k, v in sample_bindings(graph, bind).items()}

    def sample_shape(value: Any) -> tuple[int, ...] | None:
        return None if value.shape is None else tuple(int(sympy.sympify(d).subs(sizes)) for d in value.shape[1:])

    input_shape = sample_shape(inputs[0]) if inputs else None
    out_shape = outputs[0].shape if outputs else None
    classes = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None
    vocab = input_index_entries(graph)
    if vocab is not None:
        batch = load_index_batch(source, vocab, samples_per_class=samples_per_class, seed=seed, input_shape=input_shape, num_classes=classes)
    else:
        batch = load_prune_batch(source, samples_per_class=samples_per_class, seed=seed, input_shape=input_shape, num_classes=classes)
    if len(inputs) < 2:
        return batch
    shapes = {v.name: sample_shape(v) for v in inputs[1:]}
    more = other_inputs(input_roles(graph)[1:], shapes, len(batch), seed, random=str(source) == RANDOM_DATA)
    return Batch(batch.x, batch.y, batch.meta, more)


def other_inputs(roles: Sequence[InputRole], shapes: Mapping[str, tuple[int, ...] | None], samples: int, seed: int, *,
                 random: bool) -> dict[str, np.ndarray]:
    """Arrays of ``samples`` rows for a model's inputs after the first, by role: uniform indices
    in ``[0, entries)``, all-ones masks, N(0, 1) floats (seeded per input). A data file holds
    the first input only: any other input but a mask is refused."""
    out: dict[str, np.ndarray] = {}
    for index, role in enumerate(roles, start=1):
        shape = shapes.get(role.name)
        if shape is None:
            raise UsageError(f"input {role.name!r} has an unknown shape; export the model with a known input shape to feed it data")
        if role.kind != "mask" and not random:
            raise UsageError(f"input {role.name!r} ({role.kind}) gets no data from a file (x_train feeds the first input only); "
                             "use --data random, or export the model with that input folded in")
        out[role.name] = role_array(role, (samples, *shape), np.random.default_rng([seed, index]))
    return out


def load_index_batch(
    source: str | os.PathLike[str],
    entries: int,
    *,
    samples_per_class: int = 10,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> Batch:
    """A class-balanced batch of integer indices (int64) for a model that starts with embedding lookups.

    ``"random"``: indices uniform in ``[0, entries)``; a file: ``x_train`` must hold integer
    indices in ``[-entries, entries)``, taken as they are (no scaling or normalisation).
    """
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
        raise UsageError(f"--samples must be a positive integer, got {samples_per_class!r}")
    if str(source) == RANDOM_DATA:
        if input_shape is None or num_classes is None:
            raise UsageError("--data random needs the model's input shape and number of classes")
        rng = np.random.default_rng(seed)
        n = samples_per_class * int(num_classes)
        x = rng.integers(0, entries, size=(n, *[int(d) for d in input_shape]), dtype=np.int64)
        y = rng.permutation(np.repeat(np.arange(int(num_classes), dtype=np.int64), samples_per_class))
        return Batch(x, y, {"source": RANDOM_DATA, "samples_per_class": samples_per_class, "seed": seed, "classes": int(num_classes)})
    path = Path(source)
    x_all, y_all = _load_arrays(path)
    if x_all.ndim < 1 or y_all.ndim != 1 or x_all.shape[0] != y_all.shape[0]:
        raise UsageError(f"data file {path}: x_train {x_all.shape} and y_train {y_all.shape} do not match (need N x ... and N)")
    if not np.issubdtype(x_all.dtype, np.integer) or not np.issubdtype(y_all.dtype, np.integer):
        raise UsageError(f"data file {path}: the model reads embedding indices; x_train and y_train must hold integers, got {x_all.dtype} and {y_all.dtype}")
    if input_shape is not None and tuple(int(d) for d in x_all.shape[1:]) != tuple(int(d) for d in input_shape):
        raise UsageError(f"data file {path}: samples have shape {tuple(x_all.shape[1:])}, the model expects {tuple(input_shape)}")
    if x_all.size and (int(x_all.min()) < -entries or int(x_all.max()) >= entries):
        raise UsageError(f"data file {path}: indices run {int(x_all.min())}..{int(x_all.max())}, the embedding table has {entries} entries")
    if num_classes is not None and y_all.size and (y_all.min() < 0 or y_all.max() >= num_classes):
        raise UsageError(f"data file {path}: labels run {y_all.min()}..{y_all.max()}, the model has {num_classes} outputs")
    index = _balanced_indices(y_all, samples_per_class, seed, path)
    x, y = x_all[index].astype(np.int64), y_all[index].astype(np.int64)
    meta = {"source": str(path), "samples_per_class": samples_per_class, "seed": seed, "classes": int(np.unique(y).size)}
    return Batch(np.ascontiguousarray(x), y, meta)
