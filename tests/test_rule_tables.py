"""Every per-op rule table covers every OpKind, or names why a kind is handled elsewhere.

The tables: channel coupling and Param slicing (``passes/analysis/coupling/``), the DPaI
channel program (``passes/criteria/dpai/channel_program.py``), the interpreter's real and
path-count semantics (``pai_compiler/interp_tables.py``) and the MAC counts
(``passes/analysis/flops.py``). A new OpKind fails here until each table has a rule for it
or an exemption below that says where the kind is handled.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest

from pai_compiler.frontends.onnx.movement import MOVEMENT_RULES
from pai_compiler.frontends.onnx.ops import HANDLERS
from pai_compiler.interp_tables import OPAQUE_RULES, PATH_RULES, RULES
from pai_compiler.ir import OpKind
from pai_compiler.passes.analysis.coupling import COUPLING_RULES, SLICE_RULES
from pai_compiler.passes.analysis.flops import MAC_RULES
from pai_compiler.passes.criteria.dpai.channel_program import CHANNEL_RULES

_RUN_LOOP = "the interpreter's run loop feeds inputs and collects outputs itself"
_BY_OP_NAME = "an opaque node is evaluated only through OPAQUE_RULES, keyed by attrs['op'] (rule_for)"
_REAL_IS_PATH = "data movement moves path counts as it moves values: rule_for falls back to the real rule"


@dataclass(frozen=True)
class RuleTable:
    """One table keyed by OpKind, with the kinds it deliberately leaves to another mechanism."""

    name: str
    rules: Mapping[OpKind, Callable[..., object]]
    exempt: Mapping[OpKind, str] = field(default_factory=dict)


TABLES = [
    RuleTable("coupling.COUPLING_RULES", COUPLING_RULES),
    RuleTable("coupling.SLICE_RULES", SLICE_RULES),
    RuleTable("channel_program.CHANNEL_RULES", CHANNEL_RULES),
    RuleTable("interp_tables.RULES", RULES, {OpKind.INPUT: _RUN_LOOP, OpKind.OUTPUT: _RUN_LOOP, OpKind.OPAQUE: _BY_OP_NAME}),
    RuleTable("interp_tables.PATH_RULES", PATH_RULES, {
        OpKind.INPUT: _RUN_LOOP, OpKind.OUTPUT: _RUN_LOOP, OpKind.OPAQUE: _BY_OP_NAME,
        OpKind.RESHAPE: _REAL_IS_PATH, OpKind.CONCAT: _REAL_IS_PATH, OpKind.SPLIT: _REAL_IS_PATH,
    }),
    RuleTable("flops.MAC_RULES", MAC_RULES, {
        OpKind.OPAQUE: "an opaque node's MACs are unknown: the pass counts 0 and warns (its _opaque fallback)",
    }),
]


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_every_kind_has_a_rule_or_a_reason(table: RuleTable) -> None:
    missing = [kind.value for kind in OpKind if kind not in table.rules and kind not in table.exempt]
    assert not missing, f"{table.name} has no rule and no exemption for {missing}"


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_no_exemption_is_stale(table: RuleTable) -> None:
    stale = sorted(kind.value for kind in table.exempt if kind in table.rules)
    assert not stale, f"{table.name} has a rule for {stale}: drop the exemption"
    assert all(reason.strip() for reason in table.exempt.values())


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_rules_are_callable_and_keyed_by_kind(table: RuleTable) -> None:
    assert all(isinstance(kind, OpKind) for kind in table.rules)
    assert all(callable(rule) for rule in table.rules.values())


def test_path_rules_fall_back_to_a_real_rule() -> None:
    """The kinds PATH_RULES leaves to the real semantics do have a real rule."""
    path_table = next(t for t in TABLES if t.name == "interp_tables.PATH_RULES")
    fallbacks = [kind for kind, reason in path_table.exempt.items() if reason == _REAL_IS_PATH]
    assert fallbacks and all(kind in RULES for kind in fallbacks)


def test_opaque_nodes_have_rules_by_op_name() -> None:
    """The opaque exemption holds only while OPAQUE_RULES gives (real, paths) pairs."""
    assert OPAQUE_RULES
    assert all(len(pair) == 2 and all(callable(rule) for rule in pair) for pair in OPAQUE_RULES.values())


def test_every_onnx_movement_op_has_a_shape_rule() -> None:
    """The ONNX ops lowered as data movement (Gather: when it is not an embedding lookup) each have a shape rule."""
    movement_ops = {op for op, handler in HANDLERS.items() if handler.__name__ in ("_movement", "_gather")}
    assert movement_ops and movement_ops <= set(MOVEMENT_RULES), sorted(movement_ops - set(MOVEMENT_RULES))
