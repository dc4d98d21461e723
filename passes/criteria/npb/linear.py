"""NPB's program for a linear layer (max_p = 1, beta = 0), solved exactly without an integer solver.

For a layer with n_in inputs, n_out outputs, budget n, path mass P_in[i] and M[o, i] in {0, 1}
the integer program of ``_npb_milp`` reads (C = n_in + n_out, E = min(n, n_in n_out))

    maximise  alpha*A + (1-alpha)*B,   A = (C - sum_i pos(min_n - d_i) - sum_o pos(min_n - e_o)) / C,
              B = sum_i P_in[i] d_i / max_path,   sum M <= n

with d_i = sum_o M[o, i] (input degrees) and e_o = sum_i M[o, i] (output degrees). Only the degrees
matter, and any input degrees with d_i <= n_out can be wired so that the output degrees differ by
at most one, which minimises sum_o pos(min_n - e_o) for the given total. So the optimum spends
E weights and maximises sum_i f_i(d_i) with f_i(d) = w_i d + g min(d, min_n), w_i =
(1-alpha) P_in[i] / max_path, g = alpha / C: concave per input, so the E best unit gains are
optimal (same objective value as the integer program, which is far slower: 86 s for LeNet-300's
first layer in 10-row blocks). Between equal gains (to 1e-9 relative) the weights are spread evenly over the tied
inputs (seeded random order for the remainder); the outputs are wired least-loaded first
(seeded). The whole layer is one program, as in the paper: the reference splits linear layers of
more than 5120 weights into blocks of 10 rows solved independently, which on an MLP gives the
same solution in every block (LeNet-300 at 95 %: fc1 read 302 of 784 pixels, and its lumpy row
degrees made fc2 read only 60 of 300 hidden units).

With an N:M pattern (every output row keeps N of each M consecutive inputs) the program gains the
constraints sum_{i in group} M[o, i] = N for every row and group: each output then has exactly
N n_in / M weights (its node term is fixed) and the objective splits into one program per group,
sum_{i in group} d_i = N n_out, solved by the same unit gains (the layer's normalisers); the wiring
gives every row exactly N of each group (the group's weights dealt round the rows in a seeded order).
"""
from __future__ import annotations

import numpy as np

from pai_compiler.passes.criteria.npb.milp import max_path_bound

__all__ = ["input_degrees", "solve_linear", "wire", "wire_groups"]


def input_degrees(p_in: np.ndarray, n_out: int, budget: int, alpha: float, min_n: int, rng: np.random.Generator,
                  pattern: tuple[int, int] | None = None) -> np.ndarray:
    """Optimal kept weights per input (int array) for the program above (``pattern`` (N, M): N n_out per group of M inputs)."""
    p = np.asarray(p_in, dtype=np.float64)
    n_in = p.size
    total = min(int(budget), n_in * int(n_out))
    deg = np.zeros(n_in, dtype=np.int64)
    if total <= 0:
        return deg
    max_path = max_path_bound(p, total, n_out, 1)
    w = (1 - alpha) * p / max_path if max_path > 0 else np.zeros(n_in)
    g = alpha / (n_in + n_out)
    first = min(max(int(min_n), 0), int(n_out))
    # groups of equal unit gain: the first ``first`` weights of input i gain w_i + g, the rest w_i
    gain = np.concatenate([w + g, w])
    size = np.concatenate([np.full(n_in, first), np.full(n_in, n_out - first)])
    owner = np.concatenate([np.arange(n_in), np.arange(n_in)])
    keep = size > 0
    gain, size, owner = gain[keep], size[keep], owner[keep]
    # gains equal up to float noise (1e-9 relative) are ties: the same layer lowered by another
    # frontend, or summed in another order, then gets the same mask
    top = float(np.abs(gain).max()) if gain.size else 0.0
    gain = np.round(gain / top, 9) if top > 0 else gain
    order = np.argsort(-gain, kind="stable")
    gain, size, owner = gain[order], size[order], owner[order]
    if pattern is None:
        _spend(gain, size, owner, total, deg, rng)
        return deg
    n, m = pattern
    for start in range(0, n_in, m):  # one program per group, in the layer's sorted gain order
        inside = (owner >= start) & (owner < start + m)
        _spend(gain[inside], size[inside], owner[inside], n * int(n_out), deg, rng)
    return deg


def _spend(gain: np.ndarray, size: np.ndarray, owner: np.ndarray, left: int, deg: np.ndarray, rng: np.random.Generator) -> None:
    """Add ``left`` weights to ``deg`` by the best unit gains (sorted descending; ``size`` weights per
    gain group of input ``owner``), ties water-filled with a seeded remainder."""
    lo = 0
    while left > 0 and lo < gain.size:
        hi = lo + int(np.searchsorted(-gain[lo:], -gain[lo], side="right"))  # groups tied with group lo
        tied = size[lo:hi]
        if tied.sum() <= left:
            np.add.at(deg, owner[lo:hi], tied)
            left -= int(tied.sum())
        else:  # water-fill the tie: every group gets min(size, level), the remainder one each at random
            caps = np.sort(tied)
            level, done = 0, 0
            for k, cap in enumerate(caps):
                step = (int(cap) - level) * (caps.size - k)
                if done + step > left:
                    level += (left - done) // (caps.size - k)
                    break
                done, level = done + step, int(cap)
            give = np.minimum(tied, level)
            extra = left - int(give.sum())
            room = np.flatnonzero(tied > give)
            give[rng.permutation(room)[:extra]] += 1
            np.add.at(deg, owner[lo:hi], give)
            left = 0
        lo = hi


def wire(deg: np.ndarray, n_out: int, rng: np.random.Generator) -> np.ndarray:
    """(n_out, n_in) bool mask with input degrees ``deg``: inputs in random order take the least-loaded outputs.

    The output degrees then differ by at most one (ties between equally loaded outputs: random).
    """
    mask = np.zeros((int(n_out), deg.size), dtype=bool)
    load = np.zeros(int(n_out), dtype=np.int64)
    for i in rng.permutation(deg.size):
        d = int(deg[i])
        if d <= 0:
            continue
        key = load + rng.random(n_out)  # the load decides, the random fraction breaks ties
        pick = np.argpartition(key, d - 1)[:d] if d < n_out else np.arange(n_out)
        mask[pick, i] = True
        load[pick] += 1
    return mask


def wire_groups(deg: np.ndarray, n_out: int, pattern: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(n_out, n_in) bool mask with input degrees ``deg`` (each group of M summing to N n_out, each
    <= n_out) and exactly N of every group in each row: a group's weights, input after input, are
    dealt to the rows in a seeded cyclic order, so an input's d_i weights land on d_i distinct rows."""
    n, m = pattern
    mask = np.zeros((int(n_out), deg.size), dtype=bool)
    for start in range(0, deg.size, m):
        inputs = np.repeat(np.arange(start, start + m), deg[start : start + m])
        rows = rng.permutation(int(n_out))[np.arange(inputs.size) % int(n_out)]
        mask[rows, inputs] = True
    return mask


def solve_linear(p_in: np.ndarray, n_out: int, budget: int, alpha: float, min_n: int, rng: np.random.Generator,
                 pattern: tuple[int, int] | None = None) -> np.ndarray:
    """The layer's (n_out, n_in) bool mask: :func:`input_degrees` wired by :func:`wire` (with an N:M
    ``pattern``: per group, wired by :func:`wire_groups`)."""
    deg = input_degrees(p_in, n_out, budget, alpha, min_n, rng, pattern)
    return wire(deg, n_out, rng) if pattern is None else wire_groups(deg, n_out, pattern, rng)
