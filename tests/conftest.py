"""Shared fixtures: example models, data folder, single-threaded torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models"
#: The committed samples (tests/data: the first 5,000/1,000 MNIST and 200/50 CIFAR-10 train/test
#: images of ../shared/data, same keys) unless PAIC_DATA_DIR names the full datasets.
DATA_DIR = Path(os.environ.get("PAIC_DATA_DIR", ROOT / "tests" / "data"))
EXAMPLE_MODELS = ["resnet20", "vgg_small", "tiny_vit"]

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(params=EXAMPLE_MODELS)
def example_model(request: pytest.FixtureRequest) -> Path:
    return EXAMPLES / f"{request.param}.onnx"
