"""Small builder-made graphs the tests share: a residual block, a concat of branches, attention."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sympy

from pai_compiler.ir import Graph, GraphBuilder

#: the batch dim, symbolic as the frontends make it
BATCH = sympy.Symbol("batch", integer=True, positive=True)

__all__ = ["BATCH", "BUILT_GRAPHS", "attention_graph", "concat_graph", "residual_graph"]


def residual_graph(seed: int = 0) -> Graph:
    """conv-bn-relu, a two-conv residual block, global pool and a linear head."""
    b = GraphBuilder("residual", rng=np.random.default_rng(seed))
    stem = b.relu(b.batch_norm(b.conv(b.input((BATCH, 3, 8, 8)), 8, 3, pad=1)))
    branch = b.batch_norm(b.conv(b.relu(b.batch_norm(b.conv(stem, 8, 3, pad=1))), 8, 3, pad=1))
    joined = b.relu(b.add(branch, stem))
    return b.build(b.linear(b.flatten(b.global_pool(joined)), 10))


def concat_graph(seed: int = 0) -> Graph:
    """Two conv branches (1x1 and 3x3) concatenated on channels, a max pool, a linear head."""
    b = GraphBuilder("concat", rng=np.random.default_rng(seed))
    x = b.relu(b.conv(b.input((BATCH, 3, 8, 8)), 6, 3, pad=1))
    joined = b.concat(b.relu(b.conv(x, 4, 1)), b.relu(b.conv(x, 4, 3, pad=1)))
    pooled = b.pool(joined, "max", 2, 2)
    return b.build(b.linear(b.flatten(pooled), 10))


def attention_graph(seed: int = 0) -> Graph:
    """Single-head self-attention on (batch, tokens, features): q k^T, softmax, times v, projection."""
    b = GraphBuilder("attention", rng=np.random.default_rng(seed))
    x = b.input((BATCH, 5, 8))
    q, k, v = b.linear(x, 8), b.linear(x, 8, transposed=True), b.linear(x, 8)
    weights = b.softmax(b.matmul(q, b.transpose(k, [0, 2, 1])))
    mixed = b.add(b.linear(b.matmul(weights, v), 8), x)
    return b.build(b.linear(b.flatten(mixed), 4))


BUILT_GRAPHS: dict[str, Callable[[], Graph]] = {
    "residual": residual_graph,
    "concat": concat_graph,
    "attention": attention_graph,
}
