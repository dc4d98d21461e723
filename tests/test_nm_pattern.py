"""N:M patterns in the allocation (``erk{pattern=2:4}``): every scoring criterion keeps N of every M."""
from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np
import pytest

from pai_compiler.api import load_model, optimize
from pai_compiler.errors import PaicError, UsageError
from pai_compiler.ir import Param
from pai_compiler.lab.data import load_batch_for
from pai_compiler.passes.allocation.pattern import NMPattern, is_nm_mask, nm_mask, parse_pattern

VGG = Path(__file__).resolve().parents[1] / "examples" / "models" / "vgg_small.onnx"


def _brute_nm(scores: np.ndarray, in_axis: int, pattern: NMPattern) -> np.ndarray:
    """Group by group: the N highest scores, ties to the lower index (an independent loop)."""
    moved = np.moveaxis(scores, in_axis, -1)
    keep = np.zeros(moved.shape, dtype=bool)
    for index in product(*(range(d) for d in moved.shape[:-1])):
        row = moved[index]
        for start in range(0, row.size, pattern.m):
            group = row[start : start + pattern.m]
            ranked = sorted(range(pattern.m), key=lambda j: (-group[j], j))[: pattern.n]
            for j in ranked:
                keep[index + (start + j,)] = True
    return np.moveaxis(keep, -1, in_axis)


@pytest.mark.parametrize(("shape", "in_axis", "text"), [((6, 8, 3, 3), 1, "2:4"), ((12, 16), 1, "1:4"), ((16, 5), 0, "2:4"), ((4, 24), 1, "3:8")])
def test_nm_mask_equals_brute_force(shape: tuple[int, ...], in_axis: int, text: str) -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=shape).astype(np.float64)  # many ties
    param = Param("w", scores, out_axis=1 - in_axis if len(shape) == 2 else 0, in_axis=in_axis)
    pattern = parse_pattern(text, "test")
    mask = nm_mask(scores, param, pattern)
    assert np.array_equal(mask, _brute_nm(scores, in_axis, pattern))
    assert is_nm_mask(mask, param, pattern) and mask.sum() * pattern.m == mask.size * pattern.n


@pytest.mark.parametrize("text", ["2", "4:2", "0:4", "a:b", "2:2"])
def test_bad_pattern_is_a_usage_error(text: str) -> None:
    with pytest.raises(PaicError, match="pattern") as info:
        optimize(VGG, pipeline=f"erk{{pattern={text}}},magnitude")
    assert info.value.exit_code == UsageError.exit_code


@pytest.mark.parametrize("criterion", ["magnitude", "magnitude{scope=layer}", "random", "random-erk", "synflow{iterations=3}", "snip", "grasp", "dpai{steps=5}",
                                       "npb", "npb{chunk_above=64,chunk=8}"])
def test_every_scoring_criterion_keeps_n_of_m(criterion: str) -> None:
    graph = load_model(str(VGG))
    data = load_batch_for(graph, "random", samples_per_class=2, seed=0) if criterion in ("snip", "grasp") else None
    result = optimize(graph, pipeline=f"erk{{sparsity=0.5,pattern=2:4}},{criterion}", data=data)
    patterns = result.allocation.patterns
    params = result.graph.prunable_params()
    assert patterns and set(patterns) == {p.name for p in params if p.shape[p.in_axis] % 4 == 0}
    for p in params:
        if p.name in patterns:
            assert is_nm_mask(p.mask, p, NMPattern(2, 4)) and 2 * p.kept() == p.numel, p.name
    assert sum(p.kept() for p in params) == sum(result.allocation.keep.values())
    assert any("not a multiple of 4" in w for w in result.warnings)  # the 3-channel first conv stays unpatterned


def test_npb_pattern_leaves_patterned_layers_to_the_programs_and_repeats() -> None:
    """npb with 2:4: the fix-up leaves patterned layers alone (a moved weight would break a group),
    and the same seed gives the same masks."""
    runs = [optimize(load_model(str(VGG)), pipeline="uniform{sparsity=0.5,pattern=2:4},npb", seed=3) for _ in range(2)]
    report = runs[0].records[-1].report
    patterned = set(runs[0].allocation.patterns)
    assert {row["layer"] for row in report.finetune["layers"] if row.get("pattern")} == patterned
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(runs[0].graph.prunable_params(), runs[1].graph.prunable_params()))
