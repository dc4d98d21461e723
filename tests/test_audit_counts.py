"""The audit's fast nonzero count agrees with numpy's on every dtype and on NaN, -0.0 and chunk edges."""
from __future__ import annotations

import numpy as np
import pytest

from pai_compiler.audit import nonzero_count


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int8, np.bool_])
def test_nonzero_count_matches_numpy(dtype: type) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((3, (1 << 20) + 7)) < 0.3).astype(dtype) * (3 if dtype is not np.bool_ else 1)
    assert nonzero_count(data) == np.count_nonzero(data)
    assert nonzero_count(data[:, ::3].T) == np.count_nonzero(data[:, ::3])  # a strided, transposed view


def test_nan_counts_and_negative_zero_does_not() -> None:
    data = np.array([[0.0, -0.0, np.nan], [np.inf, 1e-45, 0.0]], dtype=np.float32)
    assert nonzero_count(data) == np.count_nonzero(data) == 3
    assert nonzero_count(np.zeros((0, 4), np.float32)) == 0
