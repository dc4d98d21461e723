"""Timing and report types of sparse execution: alternating medians, example inputs, the JSON schema.

``time_alternating(candidates)`` runs every candidate ``warmup`` times, then ``repeats`` rounds
in alternating order (forward, then reversed: drift on a shared machine hits all alike) and
returns each candidate's median (or, ``statistic="min"``, fastest) wall time in ms. The fastest
run is a layer's own cost on a shared machine, where a call of a fraction of a millisecond is
either run through or preempted for a whole scheduler slice. ``relative_error(got, ref) =
max|got - ref| / max(max|ref|, tiny)``, the exactness measure of every sparse kernel.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import sympy
import torch

from pai_compiler.backends.index_inputs import input_roles, role_array
from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph

__all__ = ["PLAIN", "LayerTiming", "SparseExecReport", "time_alternating", "sample_alternating", "relative_error", "example_inputs", "synchronizer", "RoundHook"]

#: the layer choice that is the dense conv unpacked (F.conv2d): installed like a sparse kernel, not one
PLAIN = "plain"
#: what time_alternating reports of each candidate's runs
STATISTICS = ("median", "min")
#: the report's schema version (its keys are stable)
SCHEMA = 3  # 2: onnxruntime_ms and advice; 3: forward, forward_ms, forward_note


@dataclass(frozen=True)
class LayerTiming:
    """One conv/linear layer: its sparsity, the candidates' medians and the choice."""

    node: str
    kind: str  # conv | linear
    weight_shape: tuple[int, ...]
    density: float  # nonzero weights / weights of the (compact) layer
    columns_used: int  # im2col taps (conv) or input features (linear) some kept weight reads
    columns: int
    # dense, plain (the dense conv unpacked) or the sparse kernel: csr | bsr (linear), layout/form (conv:
    # csr/index | csr/copy | csr/window | csr/operator | bsr/index | ...)
    choice: str
    dense_ms: float  # fastest of the alternating runs
    sparse_ms: dict[str, float]  # sparse kernel -> fastest ms (exact ones only; empty: no sparse form)
    reason: str


@dataclass
class SparseExecReport:
    """What ``build_sparse_module`` measured and chose (``to_dict`` is the ``--report`` block)."""

    device: str
    batch: int
    threads: int
    repeats: int
    warmup: int
    layers: list[LayerTiming] = field(default_factory=list)
    model_dense_ms: float = 0.0
    model_chosen_ms: float = 0.0
    fallback: str = ""  # why every layer went back to dense, if it did
    memory_format: str = "contiguous"  # of 4-d activations and weights: contiguous | channels_last
    memory_format_ms: dict[str, float] = field(default_factory=dict)  # dense model median per format
    max_relative_error: float = 0.0
    onnxruntime_ms: float | None = None  # the compact ONNX model in onnxruntime, same feed and threads (None: not measured)
    onnxruntime_note: str = ""  # why it was not measured, or did not count
    advice: str = ""  # one line when onnxruntime runs the compact ONNX model faster than this module
    forward: str = "plan"  # how calls run the chosen kernels: plan (the Python loop) or traced (its TorchScript trace)
    forward_ms: dict[str, float] = field(default_factory=dict)  # the chosen kernels' median per forward form (empty: not timed)
    forward_note: str = ""  # why the trace was not timed or not taken

    @property
    def sparse_layers(self) -> int:
        return sum(1 for row in self.layers if row.choice not in ("dense", PLAIN))

    @property
    def speedup(self) -> float:
        return self.model_dense_ms / self.model_chosen_ms if self.model_chosen_ms > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["layers"] = [{**asdict(row), "weight_shape": list(row.weight_shape)} for row in self.layers]
        doc.update(schema=SCHEMA, sparse_layers=self.sparse_layers, speedup=round(self.speedup, 4))
        return doc


#: ``on_round(rounds done, samples so far)``: told after each alternating round of a timing
RoundHook = Callable[[int, Mapping[str, list[float]]], None]


def synchronizer(device: str) -> Callable[[], None]:
    """Wait for queued device work (CUDA) before reading the clock; a no-op on CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def time_alternating(candidates: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int,
                     device: str = "cpu", statistic: str = "median", on_round: RoundHook | None = None) -> dict[str, float]:
    """Median (``statistic="min"``: fastest) ms of each candidate over ``repeats`` alternating rounds after ``warmup`` runs."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r} (expected one of {', '.join(STATISTICS)})")
    samples = sample_alternating(candidates, repeats=repeats, warmup=warmup, device=device, on_round=on_round)
    reduce = min if statistic == "min" else statistics.median
    return {name: reduce(values) * 1e3 for name, values in samples.items()}


def sample_alternating(candidates: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int,
                       device: str = "cpu", on_round: RoundHook | None = None) -> dict[str, list[float]]:
    """Every wall time (s) of each candidate over ``repeats`` alternating rounds after ``warmup`` runs of each;
    ``on_round(rounds done, samples so far)`` runs between rounds (a progress bar), outside every timed call."""
    sync = synchronizer(device)
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(max(1, repeats)):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            candidates[name]()
            sync()
            samples[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(round_index + 1, samples)
    return samples


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got - ref| / max|ref|`` (0 for two empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    scale = max(float(ref.abs().max()), 1e-30)
    return float((got.double() - ref.double()).abs().max()) / scale


def _concrete_shape(name: str, shape: Sequence[Any], batch: int, bound: Mapping[str, int]) -> list[int]:
    """``shape`` with the first dim ``batch`` and other symbols from ``bound`` (by name)."""
    dims: list[int] = []
    for index, d in enumerate(shape):
        if isinstance(d, int):
            dims.append(d)
        elif index == 0:
            dims.append(batch)
        else:
            expr = sympy.sympify(d)
            expr = expr.subs({s: bound[s.name] for s in expr.free_symbols if s.name in bound})
            if not expr.is_Integer:
                raise UsageError(f"input {name!r} has the symbolic dim {d} besides the batch; pass --input-shape (the first input's "
                                 "full shape, batch first, e.g. 1,128) or export the model with fixed shapes")
            dims.append(int(expr))
    return dims


def example_inputs(graph: Graph, *, batch: int, device: str = "cpu", seed: int = 0,
                   shape: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Inputs of ``graph``'s shapes, batch bound, by role (:func:`input_roles`): N(0, 1) floats,
    else :func:`role_array` (seeded): valid embedding indices, all ones for an integer or bool mask
    (an all-zero attention mask hides every token: a degenerate softmax that no comparison can trust).
    ``shape``: the first input's full shape (``--input-shape``); its symbolic dims bind the same
    symbols in the other inputs (an attention mask's seq), and its first dim is the batch."""
    if shape is not None:
        first = graph.inputs[0].shape if graph.inputs else None
        if first is None or len(first) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(first, shape)):
            raise UsageError(f"--input-shape {','.join(map(str, shape))} does not fit input "
                             f"{graph.inputs[0].name if graph.inputs else '?'!r} of shape {list(first) if first else '?'}")
        batch = int(shape[0])
    if batch < 1:
        raise UsageError(f"--batch must be a positive integer, got {batch}")
    bound = {str(d): int(s) for d, s in zip(graph.inputs[0].shape or (), shape or ()) if isinstance(d, sympy.Symbol)}
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    feed: list[torch.Tensor] = []
    for v, role in zip(graph.inputs, input_roles(graph)):
        if v.shape is None:
            raise UsageError(f"input {v.name!r} has no known shape; export the model with fixed input shapes")
        dims = _concrete_shape(v.name, v.shape, batch, bound)
        if role.kind == "float":
            feed.append(torch.randn(dims, generator=generator).to(device))
        else:
            feed.append(torch.from_numpy(role_array(role, dims, rng)).to(device))
    return feed
