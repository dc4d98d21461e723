"""SNIP criterion: score = |theta ⊙ dL/dtheta| / sum(|theta ⊙ dL/dtheta|), L = cross-entropy on the prune batch.

As in Synaptic-Flow (``SNIP``): the gradient is taken at the (masked) initial weights, in eval
mode (norms use their running statistics), summed over the prune batches (mean cross-entropy
per batch of ``batch_size`` samples; every graph input is fed, the first with the labels' samples, or of the model's own batch when it was exported with a
static one), and the scores are divided by their global sum. Logits of rank > 2 (a sequence
model's ``(batch, tokens, features)``) are scored per position, the last axis as classes and
each sample's label repeated over its positions (:func:`prune_loss`). Already
pruned weights count as zero, so their score is 0. The batch comes from ``--data FILE.npz``
(``am.context.data``, see :mod:`pai_compiler.lab.data`); without it the pass refuses. All tensor
work runs on ``--device`` (``am.context.device``).

This module also holds the autograd plumbing that GraSP and SynFlow share: masked leaf
tensors on ``--device`` and the checked prune batch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from pai_compiler.errors import UsageError
from pai_compiler.ir import Graph, Param, Value
from pai_compiler.pass_infra import AnalysisManager
from pai_compiler.passes.criteria.base import CriterionPass

if TYPE_CHECKING:
    import torch

    from pai_compiler.interp import Interpreter

__all__ = [
    "SnipPass", "Precision", "torch_device", "torch_dtype", "masked_leaves", "masked_weights",
    "prune_batches", "prune_loss", "model_io", "interpreter", "to_numpy_scores", "check_batch_size", "check_precision",
]

Precision = Literal["float32", "float64"]


def torch_dtype(precision: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[precision]


def torch_device(am: AnalysisManager, owner: str) -> torch.device:
    """The run's ``--device`` as a torch device; a clear error when CUDA is asked for but absent."""
    import torch

    try:
        device = torch.device(am.context.device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"{owner}: bad --device {am.context.device!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{owner}: device cuda requested but torch sees no CUDA device")
    return device


def masked_leaves(
    params: list[Param], dtype: torch.dtype, device: torch.device, *, absolute: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Leaves theta0 = theta ⊙ m (|theta| ⊙ m with ``absolute``), requiring grad, and the masks."""
    import torch

    leaves: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor | None] = {}
    for p in params:
        data = torch.as_tensor(np.array(p.data, dtype=np.float64 if dtype == torch.float64 else np.float32), device=device)
        if absolute:
            data = data.abs()
        mask = None if p.mask is None else torch.as_tensor(p.mask, device=device).to(dtype)
        leaves[p.name] = (data if mask is None else data * mask).to(dtype).requires_grad_(True)
        masks[p.name] = mask
    return leaves, masks


def masked_weights(leaves: dict[str, torch.Tensor], masks: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The Interpreter's weights theta0 ⊙ m, rebuilt for every forward (each graph is freed by its backward).

    Multiplying by the mask again keeps dL/dtheta0 = m ⊙ dL/dW, as a masked layer's
    ``weight * weight_mask`` forward does in the reference code (this matters for GraSP's
    Hessian-gradient product on an already-masked graph).
    """
    return {name: leaf if masks[name] is None else leaf * masks[name] for name, leaf in leaves.items()}


def model_io(graph: Graph, owner: str) -> tuple[Value, Value]:
    """The first input (float, or embedding indices: the labels' sample) and the first output of the model, checked for a classifier."""
    from pai_compiler.interp_tables import indexes_lookups_only

    inputs = graph.inputs
    if not inputs:
        raise UsageError(f"{owner}: the model has no input")
    if not inputs[0].dtype.startswith("float") and not indexes_lookups_only(inputs[0]):
        raise UsageError(f"{owner}: the model input {inputs[0].name!r} is {inputs[0].dtype}; a float image/feature input "
                         "(or the integer indices of embedding lookups) is needed")
    output = graph.outputs[0]
    if output.shape is not None and len(output.shape) < 2:
        raise UsageError(f"{owner}: the first output {output.name!r} has rank {len(output.shape)}; cross-entropy needs (batch, ..., classes) logits")
    if not output.dtype.startswith(("float", "bfloat")):
        raise UsageError(f"{owner}: the first output {output.name!r} is {output.dtype}; cross-entropy needs float logits (export the logits first)")
    return inputs[0], output


def _check_samples(x: np.ndarray, value: Value, owner: str) -> None:
    want = value.shape or ()
    for axis, (have, dim) in enumerate(zip(x.shape[1:], want[1:]), start=1):
        if isinstance(dim, int) and have != dim:
            raise UsageError(f"{owner}: data samples have shape {tuple(x.shape[1:])}, the model input {value.name!r} is {tuple(want[1:])} (axis {axis})")
    if x.ndim != len(want) and want:
        raise UsageError(f"{owner}: data samples have shape {tuple(x.shape[1:])}, the model input {value.name!r} has rank {len(want)}")


def _batch_arrays(graph: Graph, batch: Any, owner: str) -> list[np.ndarray]:
    """One array per graph input: ``batch.x`` for the first, ``batch.more[name]`` for the others, checked."""
    more = getattr(batch, "more", None) or {}
    arrays = [np.asarray(batch.x)]
    for value in graph.inputs[1:]:
        if value.name not in more:
            raise UsageError(f"{owner}: the prune batch has no data for model input {value.name!r}; "
                             "load it for this graph (--data random, or lab.data.load_batch_for(graph, ...))")
        arrays.append(np.asarray(more[value.name]))
    for value, array in zip(graph.inputs, arrays):
        _check_samples(array, value, owner)
        if array.shape[0] != arrays[0].shape[0]:
            raise UsageError(f"{owner}: input {value.name!r} has {array.shape[0]} samples, input {graph.inputs[0].name!r} {arrays[0].shape[0]}")
    return arrays


def prune_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; logits (N, ..., C) of rank > 2 are scored per position with the last
    axis as classes, ``labels`` (N,) repeated over the positions (or given per position, (N, ...))."""
    import torch.nn.functional as F

    if logits.dim() == 2:
        return F.cross_entropy(logits, labels)
    positions = logits.shape[1:-1].numel()
    per_position = labels.reshape(-1, 1).expand(-1, positions) if labels.dim() == 1 else labels
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), per_position.reshape(-1))


def _chunks(x_value: Value, batch_size: int, samples: int, owner: str) -> range:
    """Chunk starts: every ``batch_size`` samples, or every B for a model exported with a static
    batch B (it runs B samples at a time; the last ``samples % B`` are left out)."""
    lead = x_value.shape[0] if x_value.shape else None
    if not isinstance(lead, int):
        return range(0, samples, batch_size)
    if samples < lead:
        raise UsageError(f"{owner}: the model takes a static batch of {lead} and the prune batch holds {samples} samples; "
                         "raise --samples or export with a dynamic batch axis")
    return range(0, samples - samples % lead, lead)


def prune_batches(graph: Graph, am: AnalysisManager, owner: str, batch_size: int, dtype: torch.dtype) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """(inputs, y) chunks of the run's prune batch on ``am.context.device``, one tensor per graph
    input (floats in ``dtype``, integers as they are); refuse without data."""
    import torch

    batch: Any = am.context.data
    if batch is None:
        raise UsageError(f"{owner} is data-driven: pass --data FILE.npz (x_train/y_train, e.g. ../shared/data/cifar10.npz) or --data random")
    x_value, out_value = model_io(graph, owner)
    y = np.asarray(batch.y)
    arrays = _batch_arrays(graph, batch, owner)
    if arrays[0].shape[0] == 0 or arrays[0].shape[0] != y.shape[0]:
        raise UsageError(f"{owner}: the prune batch holds {arrays[0].shape[0]} inputs and {y.shape[0]} labels; need a non-empty, matching pair")
    classes = out_value.shape[-1] if out_value.shape else None
    if isinstance(classes, int) and y.size and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise UsageError(f"{owner}: labels run {int(y.min())}..{int(y.max())}, the model has {classes} outputs")
    device = torch_device(am, owner)
    starts = _chunks(x_value, batch_size, y.shape[0], owner)
    chunk = starts.step
    for start in starts:
        chunks = []
        for value, array in zip(graph.inputs, arrays):
            t = torch.as_tensor(array[start : start + chunk], device=device)
            chunks.append(t.to(dtype) if value.dtype.startswith("float") else t if t.dtype == torch.bool else t.long())  # indices stay integers
        yb = torch.as_tensor(y[start : start + chunk], device=device).long()
        yield chunks, yb


def interpreter(graph: Graph, am: AnalysisManager, dtype: torch.dtype) -> Interpreter:
    """A real-mode Interpreter on ``--device``; set ``.weights`` before its run (one batch size per instance)."""
    from pai_compiler.interp import Interpreter

    return Interpreter(graph, mode="real", dtype=dtype, device=torch_device(am, "interpreter"), bind=am.context.extra.get("bind"))


def to_numpy_scores(scores: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Scores on the host as float64 arrays, for the exact top-k of the criterion base."""
    return {name: t.detach().double().cpu().numpy() for name, t in scores.items()}


def check_batch_size(batch_size: int, owner: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"{owner}: batch_size must be a positive integer, got {batch_size!r}")


def check_precision(precision: str, owner: str) -> None:
    if precision not in ("float32", "float64"):
        raise UsageError(f"{owner}: precision must be float32 or float64, got {precision!r}")


@dataclass(frozen=True)
class SnipPass(CriterionPass):
    """Keep the weights whose removal changes the loss most (|theta ⊙ dL/dtheta|)."""

    name: ClassVar[str] = "snip"
    batch_size: int = 256
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_batch_size(self.batch_size, self.name)
        check_precision(self.precision, self.name)

    def scores(self, graph: Graph, am: AnalysisManager, params: list[Param]) -> dict[str, np.ndarray]:
        import torch

        dtype = torch_dtype(self.precision)
        batches = list(prune_batches(graph, am, self.name, self.batch_size, dtype))
        leaves, masks = masked_leaves(params, dtype, torch_device(am, self.name))
        for inputs, y in batches:
            it = interpreter(graph, am, dtype)  # fresh per chunk: the batch size binds symbolic dims
            it.weights = masked_weights(leaves, masks)
            logits = it.run(inputs).outputs[0]
            prune_loss(logits, y).backward()
        raw = {name: (leaf.grad * leaf.detach()).abs() if leaf.grad is not None else torch.zeros_like(leaf) for name, leaf in leaves.items()}
        total = sum(t.sum() for t in raw.values())
        if float(total) > 0:
            raw = {name: t / total for name, t in raw.items()}
        return to_numpy_scores(raw)
