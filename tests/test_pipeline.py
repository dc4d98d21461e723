"""Pipeline strings parse into frozen pass instances and print back identically."""
from __future__ import annotations

import dataclasses
import re

import pytest

from pai_compiler.api import build_passes
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


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        ({"method": "dpai", "sparsity": 0.95}, "erk{sparsity=0.95},dpai"),
        ({"method": "dpai", "sparsity": 0.99, "steps": 40}, "erk{sparsity=0.99},dpai{steps=40}"),
        ({"method": "dpai", "sparsity": 0.99, "latency": 0.5}, "erk{sparsity=0.99},dpai{latency=0.5}"),
        ({"method": "dpai", "sparsity": 0.99, "steps": 9, "latency": 1.0}, "erk{sparsity=0.99},dpai{steps=9,latency=1.0}"),
        ({"method": "magnitude", "sparsity": 0.9, "allocation": "uniform"}, "uniform{sparsity=0.9},magnitude{scope=layer}"),
        ({"method": "random-erk", "sparsity": 0.99}, "erk{sparsity=0.99},random-erk"),
        ({"method": "npb", "sparsity": 0.9}, "erk{sparsity=0.9},npb"),
        ({"method": "random", "sparsity": 0.93, "allocation": "global"}, "random{sparsity=0.93,scope=global}"),
        ({"method": "synflow", "sparsity": 0.9, "allocation": "global"}, "synflow{sparsity=0.9}"),
        ({"pipeline": "erk{sparsity=0.9},snip{scope=layer}"}, "erk{sparsity=0.9},snip{scope=layer}"),
    ],
)
def test_flags_build_pass_instances(flags: dict[str, object], text: str) -> None:
    passes = build_passes(**flags)  # type: ignore[arg-type]
    assert format_pipeline(passes) == text
    assert passes == parse_pipeline(text)  # the same frozen instances the pipeline text gives


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"method": "dpai", "sparsity": 0.9, "allocation": "global"}, "needs a per-layer allocation"),
        ({"method": "magnitude", "sparsity": 0.9, "steps": 3}, "--steps applies to --method dpai only"),
        ({"method": "snip", "sparsity": 0.9, "latency": 0.5}, "--latency applies to --method dpai only"),
        ({"pipeline": "erk{sparsity=0.9},dpai", "steps": 3}, "--steps does not combine with --pipeline; put it in the pipeline, e.g. 'erk{sparsity=0.95},dpai{steps=3}'"),
        ({"pipeline": "erk{sparsity=0.9},dpai", "latency": 0.5}, "--latency does not combine with --pipeline"),
        ({"method": "dpai", "sparsity": 0.9, "latency": 2.0}, "dpai: latency must be in [0, 1]"),
        ({"method": "magnitude", "sparsity": 0.9, "pipeline": "magnitude{sparsity=0.9}"}, "does not combine"),
        ({"method": "sparsity", "sparsity": 0.9}, "unknown option 'scope' for pass 'sparsity'"),
        ({"method": "magnitude", "sparsity": 1.5}, "erk: sparsity must be in (0, 1)"),
    ],
)
def test_flags_are_checked_once_by_the_passes_they_build(flags: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)):
        build_passes(**flags)  # type: ignore[arg-type]
