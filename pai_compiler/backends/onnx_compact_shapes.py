"""Compact ONNX, the shape-stating inputs: Reshape targets, channel Gathers, Split sizes, Resize sizes.

A mixin of the compact rewriter (:mod:`~pai_compiler.backends.onnx_compact`): after
``dead-node-elim`` every node that states a channel count in an input gets the compacted one.

* Reshape: a constant target (an int per static dim; a symbolic dim is ``0``, copying the input
  dim at that index, or the single ``-1``); where two symbolic dims need more than that, the
  exported shape tensor S stays and ``Where(changed, new, S)`` puts the new widths in, which is
  exact when every symbolic dim equals its exported value (checked: else a one-line error).
* A channel Gather gets its new indices (a fused channel shuffle's chain becomes one Gather);
  Split gets its new sizes; a Resize by constant ``sizes`` its new channel count.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import sympy

from pai_compiler.errors import PaicError
from pai_compiler.ir import Node

__all__ = ["ShapeRewrites", "set_input"]


class ShapeRewrites:
    """The rewriter's shape methods; the host class provides ``g``, ``model``, ``producers``,
    ``add_init``, ``fresh``, ``rename_output`` and ``_static``."""

    g: Any
    model: Any
    producers: dict[str, Any]
    add_init: Any
    fresh: Any
    rename_output: Any
    _static: Any

    def reshape(self, node: Node, on: Any) -> None:
        if on is None or on.op_type != "Reshape":
            return
        x, out = node.inputs[0].shape, node.outputs[0].shape
        assert out is not None
        target: list[int] = []
        for i, d in enumerate(out):
            if isinstance(d, int):
                target.append(d)
            elif x is not None and i < len(x) and _same_dim(x[i], d):
                target.append(0)
            elif -1 not in target:
                target.append(-1)
            else:
                self._runtime_reshape(node, on, out)
                return
        if any(a.name == "allowzero" and a.i for a in on.attribute) and 0 in target:
            if 0 in out:  # a literal empty dim and a copied one: no single flag says both
                raise PaicError(f"compact ONNX: Reshape {on.name!r} has allowzero=1, a symbolic dim and an empty dim")
            for a in on.attribute:  # no literal 0 in the shape: allowzero=0 means the same, and 0 copies the symbolic dim (dynamo exports)
                if a.name == "allowzero":
                    a.i = 0
        set_input(on, 1, self.add_init(f"{on.name or node.name}_shape", np.array(target, dtype=np.int64)))

    def _runtime_reshape(self, node: Node, on: Any, out: tuple[Any, ...]) -> None:
        """Two symbolic dims no constant can state (e.g. [batch, seq, 255]): the exported shape
        tensor keeps its runtime entries where the dim did not change, and
        ``Where(changed, new, shape)`` puts the new channel counts in (ONNX opset >= 9)."""
        from onnx import helper

        source = node.attrs.get("source_shape")
        fail = f"compact ONNX: cannot express the new shape {list(out)} of Reshape {on.name!r}"
        if source is None or len(source) != len(out) or len(on.input) < 2 or self._opset() < 9:
            raise PaicError(fail)
        changed = [not _same_dim(s, d) for s, d in zip(source, out)]
        if any(c and not isinstance(d, int) for c, d in zip(changed, out)):
            raise PaicError(fail + " (a changed dim is symbolic)")
        if any(c and d == 0 for c, d in zip(changed, out)):
            raise PaicError(fail + " (an empty dim)")
        flags = self.add_init(f"{on.name or node.name}_changed_dims", np.array(changed, dtype=bool))
        values = self.add_init(f"{on.name or node.name}_new_dims", np.array([d if c else 0 for c, d in zip(changed, out)], dtype=np.int64))
        shape = self.fresh(f"{on.name or node.name}_shape")
        index = next(i for i, n in enumerate(self.g.node) if n is on)
        self.g.node.insert(index, helper.make_node("Where", [flags, values, on.input[1]], [shape], name=shape))
        set_input(self.g.node[index + 1], 1, shape)

    def _opset(self) -> int:
        return next((int(o.version) for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def gather(self, node: Node, on: Any) -> None:
        """A channel gather with new indices: an ONNX Gather (a fused shuffle's chain is dropped)."""
        from onnx import helper

        target = str(node.attrs.get("replaces", node.outputs[0].name))
        producer = self.producers.get(target)
        if producer is None:
            raise PaicError(f"compact ONNX: channel gather {node.name!r} replaces {target!r}, which no ONNX node produces")
        if producer.op_type == "Gather" and target == node.outputs[0].name:
            set_input(producer, 1, self.add_init(f"{producer.name or target}_indices", np.array(node.attrs["indices"], dtype=np.int64)))
            return
        source = node.inputs[0].name
        if source not in self.producers and source not in {i.name for i in self.g.input}:
            raise PaicError(f"compact ONNX: channel gather {node.name!r} reads {source!r}, which is not a value of the ONNX model")
        self.rename_output(producer, target)  # the old chain's end: unused now, dropped below
        indices = self.add_init(f"{target}_indices", np.array(node.attrs["indices"], dtype=np.int64))
        gather = helper.make_node("Gather", [node.inputs[0].name, indices], [target], name=self.fresh(f"{target}_gather"), axis=int(node.attrs["axis"]))
        index = next(i for i, n in enumerate(self.g.node) if n is producer)
        self.g.node.insert(index + 1, gather)
        self.producers[target] = self.g.node[index + 1]

    def split(self, node: Node, on: Any) -> None:
        if on is None or on.op_type != "Split":
            return
        sizes = np.array([int(s) for s in node.attrs["sizes"]], dtype=np.int64)
        kept = [a for a in on.attribute if a.name not in ("split", "num_outputs")]
        del on.attribute[:]
        on.attribute.extend(kept)
        if self._opset() < 13:  # Split-2/11 take the sizes as the ``split`` attribute, not an input
            from onnx import helper  # heavy: onnx only where the rewriter already runs
            on.attribute.append(helper.make_attribute("split", [int(v) for v in sizes]))
            return
        set_input(on, 1, self.add_init(f"{on.name or node.name}_split", sizes))

    def resize(self, node: Node, on: Any) -> None:
        """A Resize by constant ``sizes``: its channel entry follows the compacted channel count."""
        out = node.outputs[0].shape
        if on is None or on.op_type != "Resize" or len(on.input) < 4 or not on.input[3] or out is None or not isinstance(out[1], int):
            return
        sizes = self._static(on.input[3])
        axes = next((list(a.ints) for a in on.attribute if a.name == "axes"), None)
        listed = [a % len(out) for a in axes] if axes else None  # opset 18: sizes only for these axes
        position = 1 if listed is None else (listed.index(1) if 1 in listed else None)
        if sizes is None or position is None or int(sizes[position]) == out[1]:
            return
        sizes = sizes.copy()
        sizes[position] = out[1]
        set_input(on, 3, self.add_init(f"{on.name or node.name}_sizes", sizes.astype(np.int64)))


def _same_dim(a: Any, b: Any) -> bool:
    """Two dims (ints or sympy expressions) are equal for every binding."""
    return bool(sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0)


def set_input(on: Any, index: int, name: str) -> None:
    ins = list(on.input)
    while len(ins) <= index:
        ins.append("")
    ins[index] = name
    del on.input[:]
    on.input.extend(ins)
