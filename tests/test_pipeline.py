"""Pipeline strings parse into frozen pass instances and print back identically."""
from __future__ import annotations

import dataclasses

import pytest

from pai_compiler.errors import UsageError
from pai_compiler.pipeline import format_pipeline, parse_pipeline


@pytest.mark.parametrize(
    "text",
    [
        "erk{sparsity=0.95},magnitude{scope=layer}",
        "uniform{sparsity=0.5},random{seed=3}",
        "magnitude{sparsity=0.99}",
        "erk{sparsity=0.9,power=0.5},random{scope=global,seed=7},sparsity",
    ],
)
def test_round_trip(text: str) -> None:
    passes = parse_pipeline(text)
    assert format_pipeline(passes) == text
    assert format_pipeline(parse_pipeline(format_pipeline(passes))) == text


def test_instances_are_frozen_with_typed_options() -> None:
    erk, mag = parse_pipeline(" erk { sparsity = 0.95 } , magnitude{scope=layer}")
    assert erk.sparsity == 0.95 and isinstance(erk.sparsity, float)
    assert mag.scope == "layer"
    with pytest.raises(dataclasses.FrozenInstanceError):
        erk.sparsity = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("erk{sparsity=0.9},bogus", "unknown pass 'bogus'"),
        ("erk{spars=0.9}", "unknown option 'spars'"),
        ("erk{sparsity=abc}", "bad value 'abc'"),
        ("erk{sparsity=nan}", "bad value 'nan'"),
        ("erk{sparsity=1.5}", "sparsity must be in (0, 1)"),
        ("magnitude{scope=row}", "expected one of global, layer"),
        ("erk{sparsity=0.9", "position"),
        ("erk{sparsity=0.9};magnitude", "position 17"),
        ("", "empty pipeline"),
        ("erk{sparsity=0.9,sparsity=0.8}", "given twice"),
    ],
)
def test_errors_name_the_bad_token(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_pipeline(text)
    assert needle in str(info.value)
