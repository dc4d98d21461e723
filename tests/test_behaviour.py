"""Behaviour is unchanged: masks, reports and audits equal the digests recorded in tests/golden/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from behaviour import GOLDEN, all_cases, run_case

EXPECTED = json.loads(GOLDEN.read_text())


def test_every_case_has_a_recorded_digest() -> None:
    assert sorted(EXPECTED) == sorted(all_cases())


@pytest.mark.parametrize("case", all_cases())
def test_digests_unchanged(case: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = tmp_path_factory.getbasetemp() / "behaviour"
    workdir.mkdir(exist_ok=True)
    assert run_case(case, workdir) == EXPECTED[case], f"{case}: behaviour changed (see tests/behaviour.py)"
