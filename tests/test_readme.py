"""The README's Python example runs as printed (the first ```python block of README.md)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = readme_python_blocks()[0]
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert (tmp_path / "pruned.onnx").is_file()
    pruned = namespace["pruned"]
    assert pruned.masks and all(m.dtype.is_floating_point is False for m in pruned.masks.values())  # type: ignore[attr-defined]
