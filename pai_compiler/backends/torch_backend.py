"""PyTorch backend: masks attached the ``torch.nn.utils.prune`` way, ``.pt`` checkpoints, masked ONNX.

* :func:`attach_masks` puts every mask on its parameter with ``prune.custom_from_mask``
  (``weight`` -> ``weight_orig`` parameter + ``weight_mask`` buffer + forward pre-hook that
  recomputes ``weight = weight_orig * weight_mask``); ``nn.MultiheadAttention``'s
  ``in_proj_weight`` works the same. Gradients of masked entries are zero and the effective
  weight is ``orig * mask``, so SGD with momentum and weight decay (and DDP) keeps pruned
  weights at exactly zero; ``prune.remove`` makes them permanent.
* :func:`write_pt` writes ``{"state_dict", "masks", "meta"}``: the plain module's state dict
  with pruned entries zeroed, bool masks by parameter FQN, and paic version / pipeline /
  model spec / input shape. :func:`load_pt` restores it onto a fresh module.
* :func:`write_torch_onnx` exports the masked module with the legacy exporter (dynamic
  batch, constant folding off so initializers keep their FQNs), atomically; a model with
  several inputs or a ``use_cache`` flag (Hugging Face) is exported with the graph's named
  inputs, by keyword, ``use_cache=False``.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pai_compiler._version import __version__
from pai_compiler.backends.onnx_masked import set_metadata
from pai_compiler.backends.index_inputs import input_index_entries, input_roles
from pai_compiler.backends.torch_onnx import export_onnx, takes_use_cache
from pai_compiler.errors import PaicError
from pai_compiler.interp import bound_dims
from pai_compiler.io import atomic_write, save_torch_atomic
from pai_compiler.passes.analysis.bindings import sample_bindings

__all__ = ["attach_masks", "masked_state_dict", "module_of", "write_pt", "load_pt", "write_torch_onnx", "masks_of", "named_examples"]


def module_of(graph: Any) -> nn.Module:
    """The ``nn.Module`` a torch frontend lowered (``graph.meta["torch_module"]``)."""
    handle = graph.meta.get("torch_module")
    module = getattr(handle, "module", handle)
    if not isinstance(module, nn.Module):
        raise PaicError("this graph was not lowered from a PyTorch module: write it as .onnx instead")
    return module


def masks_of(result: Any) -> dict[str, torch.Tensor]:
    """Bool masks (parameter FQN -> tensor) of an OptimizeResult or a Graph."""
    graph = getattr(result, "graph", result)
    return {p.origin or p.name: torch.from_numpy(np.ascontiguousarray(p.mask_or_ones())) for p in graph.prunable_params()}


def _split(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    owner, _, name = fqn.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        raise PaicError(f"mask for {fqn!r}: the model has no submodule {owner!r}") from None
    if not isinstance(getattr(module, name, None), torch.Tensor) and not hasattr(module, f"{name}_orig"):
        raise PaicError(f"mask for {fqn!r}: {type(module).__name__} {owner or '(root)'!r} has no parameter {name!r}")
    return module, name


def with_aliases(model: nn.Module, masks: Mapping[str, Any]) -> dict[str, Any]:
    """``masks`` extended to every other name of a tied parameter (``b.weight = a.weight``)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    out = dict(masks)
    for group in names.values():
        owner = next((n for n in group if n in masks), None)
        for alias in group if owner is not None else ():
            out.setdefault(alias, masks[owner])
    return out


def attach_masks(model: nn.Module, masks: Mapping[str, Any]) -> nn.Module:
    """Attach ``masks`` (FQN -> bool array/tensor) with ``torch.nn.utils.prune.custom_from_mask``;
    every name of a tied parameter gets the mask, so the tie (one ``weight_orig``) holds."""
    from torch.nn.utils import prune

    for fqn, mask in with_aliases(model, masks).items():
        module, name = _split(model, fqn)
        current = getattr(module, name)
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if tuple(m.shape) != tuple(current.shape):
            raise PaicError(f"mask for {fqn!r} has shape {tuple(m.shape)}, the parameter has {tuple(current.shape)}")
        prune.custom_from_mask(module, name, m.to(device=current.device, dtype=current.dtype))
        _refresh_from_parent(model, fqn)
    return model


def _refresh_from_parent(model: nn.Module, fqn: str) -> None:
    """``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling ``out_proj``: the
    pruning pre-hook of ``out_proj`` would never run, leaving a stale weight (and a freed
    autograd graph after the first backward). Run it from the attention module's pre-hook."""
    from torch.nn.utils import prune

    owner = fqn.rpartition(".")[0]
    parent_name, _, child_name = owner.rpartition(".")
    if child_name != "out_proj":
        return
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.MultiheadAttention) or getattr(parent, "_paic_out_proj_hook", False):
        return
    child = parent.out_proj

    def refresh(module: nn.Module, args: Any) -> None:
        for hook in list(child._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                hook(child, args)

    parent.register_forward_pre_hook(refresh)
    parent._paic_out_proj_hook = True  # type: ignore[assignment]


def masked_state_dict(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (un-pruned names) with every masked parameter multiplied by its mask."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_mask")}
    for key in [k for k in state if k.endswith("_orig")]:
        state[key[: -len("_orig")]] = state.pop(key)
    for fqn, mask in with_aliases(model, masks).items():
        if fqn not in state:
            raise PaicError(f"mask for {fqn!r}: not in the model's state dict")
        state[fqn] = state[fqn] * mask.to(state[fqn].device, state[fqn].dtype)
    return state


def write_pt(result: Any, source_spec: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Write ``{"state_dict", "masks", "meta"}`` for the pruned torch model (atomically)."""
    graph = result.graph
    model = module_of(graph)
    masks = masks_of(result)
    meta = {
        "paic_version": __version__,
        "pipeline": result.pipeline,
        "model": str(source_spec),
        "input_shape": graph.meta.get("input_shape"),
        "frontend": graph.meta.get("frontend"),
        "density": _density(masks),
    }
    payload = {"state_dict": masked_state_dict(model, masks), "masks": masks, "meta": meta}
    save_torch_atomic(out, payload)


def _density(masks: Mapping[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / total) if total else 1.0


def load_pt(path: str | os.PathLike[str], model: nn.Module, *, attach: bool = True) -> nn.Module:
    """Load a ``write_pt`` checkpoint into ``model`` (same architecture) and attach its masks."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PaicError(f"{path}: not a paic checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or not {"state_dict", "masks"} <= set(payload):
        raise PaicError(f"{path}: not a paic checkpoint (expected keys state_dict, masks, meta)")
    model.load_state_dict(payload["state_dict"])
    if attach:
        attach_masks(model, payload["masks"])
    return model


_EXAMPLE_BATCH = 2


def named_examples(graph: Any) -> list[tuple[str, torch.Tensor]]:
    """A seeded example batch of 2 for each graph input, by name: indices below the smallest
    table they pick rows of, all-ones masks, N(0, 1) floats (see :func:`input_roles`)."""
    generator = torch.Generator().manual_seed(0)
    bind = {**sample_bindings(graph), **{name: _EXAMPLE_BATCH for name in _batch_symbols(graph)}}
    out = []
    for value, role in zip(graph.inputs, input_roles(graph)):
        if value.shape is None:
            raise PaicError(f"cannot export to ONNX: input {value.name!r} has an unknown shape (give --input-shape {value.name}=...)")
        dims = bound_dims(value.shape, bind)
        dtype = getattr(torch, role.dtype, torch.float32)
        if role.kind == "indices":
            out.append((value.name, torch.randint(0, int(role.entries or 1), dims, generator=generator).to(dtype)))
        elif role.kind == "mask":
            out.append((value.name, torch.ones(dims, dtype=dtype)))
        else:
            out.append((value.name, torch.randn(dims, generator=generator).to(dtype)))
    return out


def _batch_symbols(graph: Any) -> set[str]:
    return {s.name for v in graph.inputs if v.shape and not isinstance(v.shape[0], int) for s in v.shape[0].free_symbols}


def write_torch_onnx(result: Any, out: str | os.PathLike[str]) -> None:
    """Export the masked module to ONNX (legacy exporter, dynamic batch), atomically."""
    import onnx

    graph = result.graph
    shape = graph.meta.get("input_shape")
    if not shape:
        raise PaicError("cannot export to ONNX: the model's input shape is unknown (give --input-shape)")
    model = copy.deepcopy(module_of(graph))
    model.load_state_dict(masked_state_dict(model, masks_of(result)))
    named = named_examples(graph) if len(graph.inputs) > 1 or takes_use_cache(model) else None
    with atomic_write(out) as tmp:
        try:
            export_onnx(model, tuple(shape[1:]), tmp, index_entries=input_index_entries(graph), named_inputs=named)
        except Exception as exc:
            hint = "; write the masked module with -o X.pt instead" if named else ""
            raise PaicError(f"torch.onnx.export failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}{hint}") from None
        proto = onnx.load(str(tmp))
        set_metadata(proto, {"paic.version": __version__, "paic.pipeline": getattr(result, "pipeline", "")})
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp))
