"""Dims without sympy until a model has a symbolic one.

A dim is an ``int`` or a sympy expression over positive-integer symbols (a dynamic batch, a
sequence length). Importing sympy costs ~0.3 s, most of a static model's ``paic audit
--no-paths``, so nothing imports it up front: ``is_symbolic(x)`` asks ``sys.modules`` first (no
object can be a sympy expression before sympy is imported), and ``sym()`` imports it on demand,
the first time a symbol or an expression over one is built. Integer arithmetic stays integer:
``floor_div(7, 2) == 3`` never touches sympy, ``floor_div(n, 2)`` is ``floor(n/2)``.
"""
from __future__ import annotations

import sys
from numbers import Integral
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sympy

__all__ = ["sym", "is_symbolic", "is_symbol", "dim_symbol", "as_expr", "plain", "dim_sum", "floor_div", "ceil_div"]


def sym() -> ModuleType:
    """The sympy module, imported on first use."""
    import sympy  # heavy (~0.3 s): only once a dim is symbolic

    return sympy


def is_symbolic(x: Any) -> bool:
    """True when ``x`` is a sympy object (an expression, a symbol, a sympy integer)."""
    module = sys.modules.get("sympy")
    return module is not None and isinstance(x, module.Basic)


def is_symbol(x: Any) -> bool:
    """True when ``x`` is a sympy Symbol."""
    module = sys.modules.get("sympy")
    return module is not None and isinstance(x, module.Symbol)


def dim_symbol(name: str) -> sympy.Symbol:
    """The positive-integer symbol the IR uses for a named dim."""
    return sym().Symbol(name, integer=True, positive=True)


def as_expr(x: Any) -> sympy.Expr:
    """``sympy.sympify(x)``."""
    return sym().sympify(x)


def plain(x: Any) -> Any:
    """A numpy integer as a Python int (sympy mixes with ints, not with numpy scalars); else ``x``."""
    return int(x) if isinstance(x, Integral) else x


def dim_sum(values: Any) -> Any:
    """The sum of dims: an int while every term is one."""
    total: Any = 0
    for v in values:
        total = total + plain(v)
    return total


def floor_div(a: Any, b: Any) -> Any:
    """``floor(a / b)``: an int for ints, a sympy expression otherwise."""
    if isinstance(a, Integral) and isinstance(b, Integral):
        return int(a) // int(b)
    return sym().floor(as_expr(a) / as_expr(b))


def ceil_div(a: Any, b: Any) -> Any:
    """``ceiling(a / b)``: an int for ints, a sympy expression otherwise."""
    if isinstance(a, Integral) and isinstance(b, Integral):
        return -(-int(a) // int(b))
    return sym().ceiling(as_expr(a) / as_expr(b))
