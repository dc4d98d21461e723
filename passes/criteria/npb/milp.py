"""NPB's per-layer integer program (algorithms.md §2.1 item 4), solved by HiGHS via ``scipy.optimize.milp``.

Variables per (block of a) layer: M[k] in {0..max_p}, the kept taps of kernel k = (o, i);
u_c >= 0 per input channel c, v_o >= 0 per output channel, w_k in [0, 1]. With n the budget,
P_in[c] the path mass entering input channel c and C = #inputs + #outputs:

    maximise  alpha*A + (1-alpha)*B + beta*Reg
    A   = (C - sum_c u_c - sum_o v_o) / C      u_c >= min_n - sum_{k into c} M[k],  v_o >= min_n - sum_{k out of o} M[k]
    B   = sum_k P_in[c(k)] M[k] / max_path     (max_path: see :func:`max_path_bound`)
    Reg = (n - sum_k w_k) / n                   w_k >= 1 - M[k]   (rewards non-empty kernels)
    s.t. sum_k M[k] <= n

u, v and w are continuous; at the optimum they equal pos(min_n - ...) and pos(1 - M), as in the
reference's cvxpy formulation. An N:M pattern adds sum_{k in group} M[k] = group_total for every
group of M kernels (consecutive input channels of one output: N of M weights at each tap means
N x taps kept taps per group; :func:`~pai_compiler.passes.criteria.npb.criterion` places them).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from pai_compiler.errors import PaicError

__all__ = ["BlockProblem", "BlockSolution", "ceil_budget", "max_path_bound", "solve_block"]


@dataclass(frozen=True)
class BlockProblem:
    """One integer program: ``kernel_in[k]`` is the input channel of kernel k, ``kernel_out[k]`` its output."""

    kernel_in: np.ndarray
    kernel_out: np.ndarray
    n_in: int
    n_out: int
    p_in: np.ndarray  # path mass per input channel
    budget: int
    max_p: int
    alpha: float
    beta: float
    min_n: int
    group_of: np.ndarray | None = None  # N:M: the pattern group of each kernel
    group_total: int = 0  # kept taps every group holds exactly


@dataclass(frozen=True)
class BlockSolution:
    counts: np.ndarray  # kept taps per kernel
    seconds: float
    status: str


def max_path_bound(p_in: np.ndarray, budget: int, n_out: int, cap: int) -> float:
    """The reference's normaliser of B: the budget greedily on the input channels with the largest P_in.

    A channel takes at most n_out * cap weights; full = floor(budget / (n_out * cap)) channels
    are filled and the rest goes on the next one. Reference quirk, kept: with full = 0 the
    reference's slice ``sort(P)[-0:]`` takes *every* channel, so max_path = sum(P) n_out cap +
    budget * max(P); B then weighs far less and the node term spreads the inputs (at 99 % on
    ResNet-20 this is the case for every layer but the classifier).
    """
    order = np.sort(np.asarray(p_in, dtype=np.float64))
    per_channel = int(n_out) * int(cap)
    full = int(budget) // per_channel
    rest = int(budget) - full * per_channel
    top = order if full == 0 else order[-full:]
    bound = float(top.sum()) * per_channel
    if full + 1 <= order.size:
        bound += rest * float(order[-(full + 1)])
    return bound


def solve_block(prob: BlockProblem, time_limit: float = 60.0) -> BlockSolution:
    """Solve one block; returns kept taps per kernel (int array)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, csr_matrix, vstack

    n_k = prob.kernel_in.size
    budget = min(int(prob.budget), n_k * prob.max_p)
    if budget <= 0 or n_k == 0:
        return BlockSolution(np.zeros(n_k, dtype=np.int64), 0.0, "empty")
    use_w = prob.beta > 0
    n_var = n_k + prob.n_in + prob.n_out + (n_k if use_w else 0)
    p_kernel = np.asarray(prob.p_in, dtype=np.float64)[prob.kernel_in]
    max_path = max_path_bound(prob.p_in, budget, prob.n_out, prob.max_p)
    c = np.zeros(n_var)
    c[:n_k] = -(1 - prob.alpha) * p_kernel / max_path if max_path > 0 else 0.0
    c[n_k : n_k + prob.n_in + prob.n_out] = prob.alpha / (prob.n_in + prob.n_out)
    if use_w:
        c[n_k + prob.n_in + prob.n_out :] = prob.beta / budget
    ks = np.arange(n_k)
    rows = [csr_matrix((np.ones(n_k), (np.zeros(n_k, dtype=np.int64), ks)), shape=(1, n_var))]
    lower, upper = [np.array([-np.inf])], [np.array([float(budget)])]
    for size, owner, offset in ((prob.n_in, prob.kernel_in, n_k), (prob.n_out, prob.kernel_out, n_k + prob.n_in)):
        r = np.concatenate([owner, np.arange(size)])
        col = np.concatenate([ks, offset + np.arange(size)])
        rows.append(coo_matrix((np.ones(r.size), (r, col)), shape=(size, n_var)).tocsr())
        lower.append(np.full(size, float(prob.min_n)))
        upper.append(np.full(size, np.inf))
    if use_w:
        w0 = n_k + prob.n_in + prob.n_out
        r = np.concatenate([ks, ks])
        rows.append(coo_matrix((np.ones(2 * n_k), (r, np.concatenate([ks, w0 + ks]))), shape=(n_k, n_var)).tocsr())
        lower.append(np.ones(n_k))
        upper.append(np.full(n_k, np.inf))
    if prob.group_of is not None:
        n_groups = int(prob.group_of.max()) + 1
        rows.append(coo_matrix((np.ones(n_k), (prob.group_of, ks)), shape=(n_groups, n_var)).tocsr())
        lower.append(np.full(n_groups, float(prob.group_total)))
        upper.append(np.full(n_groups, float(prob.group_total)))
    constraint = LinearConstraint(vstack(rows).tocsr(), np.concatenate(lower), np.concatenate(upper))
    hi = np.concatenate([np.full(n_k, float(prob.max_p)), np.full(prob.n_in + prob.n_out, float(prob.min_n)), np.ones(n_k if use_w else 0)])
    integrality = np.concatenate([np.ones(n_k), np.zeros(n_var - n_k)])
    start = time.perf_counter()
    res = milp(c, constraints=constraint, integrality=integrality, bounds=Bounds(np.zeros(n_var), hi), options={"time_limit": time_limit})
    seconds = time.perf_counter() - start
    if res.x is None:
        raise PaicError(f"npb: the layer integer program failed ({res.message})")
    counts = np.clip(np.rint(res.x[:n_k]), 0, prob.max_p).astype(np.int64)
    while counts.sum() > budget:  # guard against rounding of a time-limited solution
        counts[int(np.argmax(counts))] -= 1
    return BlockSolution(counts, seconds, "optimal" if res.status == 0 else str(res.message))


def ceil_budget(density: float, numel: int) -> int:
    """The reference's per-block budget: ceil(rho * numel) (with a float guard)."""
    return int(math.ceil(density * numel - 1e-9))
