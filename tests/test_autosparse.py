"""AutoSparse: iterative rewind pruning labels, resume, the predictor file, the criterion pass, the shipped predictor."""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pai_compiler.api import optimize
from pai_compiler.lab.autosparse_collect import CollectConfig, LabelSet, collect
from pai_compiler.passes.criteria.autosparse.predictor import Predictor, default_predictor_path, load_predictor, split_groups, train_predictor
from pai_compiler.cli import app
from pai_compiler.errors import PaicError, UsageError
from pai_compiler.passes.criteria.autosparse.criterion import floored_topk

ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT / "examples" / "models" / "resnet20.onnx"
DATA_FREE = ("w", "abs_w", "log_fan_in", "log_numel")

torch.set_num_threads(1)

TINY_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(h, 1))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-layer CNN (file.py:attr) and a learnable 4-class 8x8 dataset (class = bright quadrant)."""
    folder = tmp_path_factory.mktemp("autosparse")
    (folder / "tiny_model.py").write_text(TINY_MODEL)
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(4), n // 4).astype(np.uint8)
        x = rng.integers(0, 100, size=(n, 8, 8)).astype(np.uint8)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 120
        return x, y

    (x_train, y_train), (x_test, y_test) = make(256), make(64)
    np.savez(folder / "toy.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return {"folder": folder, "model": f"{folder / 'tiny_model.py'}:Tiny", "data": str(folder / "toy.npz")}


def _config(tiny: dict[str, Any], rounds: int = 2, **kw: Any) -> CollectConfig:
    return CollectConfig(model=tiny["model"], data=tiny["data"], rounds=rounds, rate=0.5, epochs=1, lr=0.05, batch_size=32, **kw)


@pytest.fixture(scope="module")
def labels(tiny: dict[str, Any]) -> tuple[LabelSet, Path, list[dict[str, Any]]]:
    """An uninterrupted 2-round run, with what the model held after each round's rewind."""
    seen: list[dict[str, Any]] = []

    def snapshot(r: int, model: torch.nn.Module, ls: LabelSet) -> None:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    out = tiny["folder"] / "full.npz"
    ls = collect(_config(tiny), out, progress=False, on_round=snapshot)
    return ls, out, seen


def test_survival_counts_follow_the_rate(labels: tuple[LabelSet, Path, list[dict[str, Any]]]) -> None:
    ls, out, _ = labels
    n = ls.w0.size
    assert n == 4 * 9 + 8 * 4 * 9 + 128 * 4 and ls.rounds_done == 2
    alive = n
    for r in (1, 2):
        alive -= math.floor(0.5 * alive)
        assert int((ls.survived >= r).sum()) == alive
    assert ls.survived.min() == 0 and ls.survived.max() == 2
    assert [i.name for i in ls.layers] == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert [(i.fan_in, i.numel) for i in ls.layers] == [(9, 36), (36, 288), (128, 512)]
    assert np.array_equal(np.bincount(ls.layer), [36, 288, 512])
    assert np.isfinite(ls.g0).all() and np.abs(ls.g0).sum() > 0
    again = LabelSet.load(out)
    assert np.array_equal(again.survived, ls.survived) and again.meta["config"]["rate"] == 0.5
    assert [h["round"] for h in again.meta["history"]] == [1, 2]


def test_snip_rounds_keep_the_same_counts(tiny: dict[str, Any], tmp_path: Path) -> None:
    ls = collect(_config(tiny, rounds=1, prune_by="snip"), tmp_path / "snip.npz", progress=False)
    assert int((ls.survived == 1).sum()) == ls.w0.size - math.floor(0.5 * ls.w0.size)
    with pytest.raises(UsageError, match="prune-by"):
        collect(_config(tiny, prune_by="grasp"), tmp_path / "bad.npz", progress=False)


def test_rewind_restores_init_values_exactly(tiny: dict[str, Any], labels: tuple[LabelSet, Path, list[dict[str, Any]]]) -> None:
    from pai_compiler.lab.autosparse_collect import build_model

    ls, _, seen = labels
    init = build_model(tiny["model"], 0).state_dict()
    for r, state in enumerate(seen, start=1):
        alive = ls.survived >= r
        flat = np.concatenate([state[i.name].reshape(-1).numpy() for i in ls.layers])
        assert np.array_equal(flat[alive], ls.w0[alive]) and not flat[~alive].any()
        for key in ("conv1.bias", "conv2.bias", "fc.bias"):
            assert torch.equal(state[key], init[key])  # everything is rewound, not only the weights


def test_resume_equals_uninterrupted(tiny: dict[str, Any], labels: tuple[LabelSet, Path, list[dict[str, Any]]]) -> None:
    ls, _, _ = labels
    out = tiny["folder"] / "resumed.npz"

    def stop(r: int, model: torch.nn.Module, partial: LabelSet) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(_config(tiny), out, progress=False, on_round=stop)
    assert LabelSet.load(out).rounds_done == 1
    with pytest.raises(UsageError, match="exists"):
        collect(_config(tiny), out, progress=False)
    with pytest.raises(UsageError, match="different settings"):
        collect(_config(tiny, seed=1), out, resume=True, progress=False)
    resumed = collect(_config(tiny), out, resume=True, progress=False)
    for key in ("w0", "g0", "survived", "layer"):
        assert np.array_equal(getattr(resumed, key), getattr(ls, key)), key
    keys = ("round", "test_accuracy", "train_loss", "density_after")
    assert [{k: h[k] for k in keys} for h in resumed.meta["history"]] == [{k: h[k] for k in keys} for h in ls.meta["history"]]


def test_cli_collect_zoo_model_and_train(tmp_path: Path, data_dir: Path, tiny: dict[str, Any], labels: tuple[LabelSet, Path, list[dict[str, Any]]]) -> None:
    runner = CliRunner()
    out = tmp_path / "lenet.npz"
    res = runner.invoke(app, ["autosparse", "collect", "zoo:lenet5", "--data", str(data_dir / "mnist.npz"), "--rounds", "1", "--rate", "0.5",
                              "--limit", "256", "--limit-test", "100", "-o", str(out)])
    assert res.exit_code == 0, res.output
    lenet = LabelSet.load(out)
    assert lenet.w0.size == 430_500 and int((lenet.survived == 1).sum()) == 430_500 - math.floor(0.5 * 430_500)
    bad = runner.invoke(app, ["autosparse", "collect", "zoo:nope", "--data", tiny["data"], "-o", str(tmp_path / "x.npz")])
    assert bad.exit_code == 2 and "unknown zoo model" in bad.output
    second = tmp_path / "second.npz"
    collect(_config(tiny, rounds=1, seed=3), second, progress=False)
    pred = tmp_path / "pred.npz"
    res = runner.invoke(app, ["autosparse", "train", str(labels[1]), str(second), "-o", str(pred), "--epochs", "2", "-q"])
    assert res.exit_code == 0, res.output
    predictor = Predictor.load(pred)
    assert predictor.meta["split"] == "file" and all(g.startswith("second.npz:") for g in predictor.meta["heldout_groups"])
    assert math.isfinite(predictor.meta["heldout"]["mse"])


def test_pass_gradient_matches_collected_g0(tiny: dict[str, Any], labels: tuple[LabelSet, Path, list[dict[str, Any]]], data_free: Path) -> None:
    """The criterion's g0 (IR interpreter) is the feature the predictor was trained on (nn.Module, eval mode)."""
    from pai_compiler.lab.data import load_prune_batch
    from pai_compiler.frontends.torch.spec import load_torch_spec
    from pai_compiler.pass_infra import AnalysisManager, RunContext
    from pai_compiler.passes.criteria.autosparse.criterion import AutosparsePass

    ls = labels[0]
    graph = load_torch_spec(tiny["model"], input_shape=(2, 1, 8, 8))
    batch = load_prune_batch(tiny["data"], samples_per_class=10, seed=0, input_shape=(1, 8, 8))
    params = graph.prunable_params()
    grads = AutosparsePass(sparsity=0.5).gradients(graph, AnalysisManager(graph, RunContext(data=batch)), params, load_predictor("default"))
    assert grads is not None and [p.name for p in params] == [i.name for i in ls.layers]
    flat = np.concatenate([grads[p.name].reshape(-1) for p in params])
    assert np.allclose(flat, ls.g0, rtol=1e-4, atol=1e-7)
    assert AutosparsePass(predictor=str(data_free)).gradients(graph, AnalysisManager(graph), params, Predictor.load(data_free)) is None


def test_heldout_split_is_disjoint(labels: tuple[LabelSet, Path, list[dict[str, Any]]]) -> None:
    ls = labels[0]
    train, held = split_groups([ls])
    assert held == [(0, 1)] and train == [(0, 0), (0, 2)]
    train, held = split_groups([ls, ls, ls], "file")
    assert set(train).isdisjoint(held) and {f for f, _ in held} == {2} and len(train) + len(held) == 9
    train, held = split_groups([ls, ls], "layer")
    assert set(train).isdisjoint(held) and set(train) | set(held) == {(f, l) for f in (0, 1) for l in range(3)}
    with pytest.raises(UsageError):
        split_groups([ls], "file")


def test_predictor_save_load_round_trip(tmp_path: Path, labels: tuple[LabelSet, Path, list[dict[str, Any]]]) -> None:
    ls = labels[0]
    predictor, report = train_predictor([ls], epochs=3, seed=1)
    again, _ = train_predictor([ls], epochs=3, seed=1)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(predictor.layers, again.layers))  # deterministic
    assert report["split"] == "layer" and report["heldout_groups"] == ["0:conv2.weight"]
    path = tmp_path / "p.npz"
    predictor.save(path)
    loaded = Predictor.load(path)
    assert loaded.features == predictor.features and loaded.standardize == "layer" and loaded.needs_gradient
    assert loaded.meta["heldout"]["mse"] == report["heldout"]["mse"]
    x = np.random.default_rng(0).standard_normal((50, len(predictor.features))).astype(np.float32)
    assert np.array_equal(loaded.predict(x), predictor.predict(x))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UsageError):
        Predictor.load(tmp_path / "junk.npz")
    with pytest.raises(UsageError, match="not found"):
        load_predictor(tmp_path / "missing.npz")


def test_floored_topk_exact_count_and_floor() -> None:
    scores = [np.full(10, 0.1), np.linspace(0.5, 0.9, 100), np.linspace(0.2, 0.95, 1000)]
    masks = floored_topk(scores, 50, [2, 1, 3])
    assert sum(int(m.sum()) for m in masks) == 50
    assert [int(m.sum()) >= f for m, f in zip(masks, [2, 1, 3])] == [True] * 3
    assert masks[0][:2].all() and not masks[0][2:].any()  # ties: lower index first
    plain = floored_topk(scores, 50, [0, 0, 0])
    assert not plain[0].any()  # without the floor the first layer collapses


@pytest.fixture(scope="module")
def data_free(tmp_path_factory: pytest.TempPathFactory, labels: tuple[LabelSet, Path, list[dict[str, Any]]]) -> Path:
    predictor, _ = train_predictor([labels[0]], features=DATA_FREE, epochs=3)
    path = tmp_path_factory.mktemp("pred") / "free.npz"
    predictor.save(path)
    return path


def test_criterion_counts_floor_determinism(data_free: Path, labels: tuple[LabelSet, Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    spec = f"autosparse{{sparsity=0.995,predictor={data_free},min_density=0.003}}"
    first = optimize(RESNET20, pipeline=spec)
    params = first.graph.prunable_params()
    total = sum(p.numel for p in params)
    assert sum(p.kept() for p in params) == total - math.floor(0.995 * total)
    assert all(p.kept() >= max(1, math.ceil(0.003 * p.numel)) for p in params)
    second = optimize(RESNET20, pipeline=spec)
    assert all(np.array_equal(p.mask, q.mask) for p, q in zip(params, second.graph.prunable_params()))
    layered = optimize(RESNET20, pipeline=f"erk{{sparsity=0.9}},autosparse{{scope=layer,predictor={data_free}}}")
    assert layered.allocation is not None
    assert dict(layered.allocation.keep) == {p.name: p.kept() for p in layered.graph.prunable_params()}
    predictor, _ = train_predictor([labels[0]], epochs=1)
    needs_g = tmp_path / "g.npz"
    predictor.save(needs_g)
    with pytest.raises(PaicError, match=r"pass --data FILE\.npz") as info:
        optimize(RESNET20, pipeline=f"autosparse{{sparsity=0.9,predictor={needs_g}}}")
    assert info.value.exit_code == UsageError.exit_code
    with pytest.raises(PaicError, match="min_density"):
        optimize(RESNET20, pipeline="autosparse{sparsity=0.9,min_density=1.5}")


def test_default_predictor_is_package_data_and_prunes_resnet20(data_dir: Path) -> None:
    path = default_predictor_path()
    assert path.parent == ROOT / "passes" / "criteria" / "autosparse" and path.is_file() and path.stat().st_size < 1_000_000
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "default_predictor.npz" in package_data["pai_compiler.passes.criteria.autosparse"]
    predictor = load_predictor("default")
    assert predictor.meta["heldout"]["mse"] < predictor.meta["heldout"]["baseline_mse"]
    data = None
    if predictor.needs_gradient:
        from pai_compiler.lab.data import load_prune_batch

        data = load_prune_batch(data_dir / "cifar10.npz", samples_per_class=10, seed=0, input_shape=(3, 32, 32))
    result = optimize(RESNET20, pipeline="autosparse{sparsity=0.99}", data=data)
    params = result.graph.prunable_params()
    total = sum(p.numel for p in params)
    assert sum(p.kept() for p in params) == total - math.floor(0.99 * total)
    assert all(p.kept() >= math.ceil(0.002 * p.numel) for p in params)
    assert result.pipeline == "autosparse{sparsity=0.99}"
