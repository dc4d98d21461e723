"""SynFlow, SNIP, GraSP, random-ERK, magnitude: scores vs eager-torch formulas, masks, scopes, data, determinism."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from torch import nn

from pai_compiler.lab.data import Batch, load_batch_for, load_prune_batch
from pai_compiler.errors import PaicError, UsageError
from pai_compiler.frontends.onnx.reader import load_onnx_model
from pai_compiler.interp import Interpreter
from pai_compiler.ir import Graph
from pai_compiler.pass_infra import AnalysisManager, PassManager, RunContext
from pai_compiler.passes.allocation.base import Allocation
from pai_compiler.passes.criteria.grasp import GraspPass
from pai_compiler.passes.criteria.snip import SnipPass
from pai_compiler.passes.criteria.synflow import SynflowPass, schedule_keep, topk_mask_torch
from pai_compiler.pipeline import parse_pipeline
from pai_compiler.backends.torch_onnx import export_onnx

torch.set_num_threads(1)


# ---- tiny models: torch modules with non-trivial (signed) norm statistics ------------------
class TinyConv(nn.Module):
    """conv-BN-ReLU, conv-BN + residual, ReLU, global average pool, linear (3x8x8 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class TinyMLP(nn.Module):
    """linear-LayerNorm-ReLU, linear-tanh, linear (12 -> 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(F.relu(self.ln(self.fc1(x))))))


def _randomise_norms(model: nn.Module) -> None:
    """Signed scales/shifts and non-trivial running stats, so abs-linearisation is visible."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "conv": (TinyConv, (3, 8, 8), 5),
    "mlp": (TinyMLP, (12,), 4),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path, tuple[int, ...], int]]:
    out = {}
    for key, (factory, shape, classes) in MODELS.items():
        torch.manual_seed(1)
        model = factory()
        _randomise_norms(model)
        model.eval()
        path = tmp_path_factory.mktemp("models") / f"{key}.onnx"
        export_onnx(model, shape, path)
        out[key] = (model, path, shape, classes)
    return out


def _batch(shape: tuple[int, ...], classes: int, n_per_class: int = 6, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    return Batch(rng.standard_normal((y.size, *shape)).astype(np.float32), y.astype(np.int64), {})


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Conv/linear weight leaves by state_dict name (``weight_orig`` once torch.nn.utils.prune masks it)."""
    return {f"{n}.weight": getattr(m, "weight_orig", m.weight) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _fresh(model: nn.Module) -> nn.Module:
    """A float64 eval copy (a masked copy from _masked_copy is already private and cannot be deep-copied)."""
    masked = any(hasattr(m, "weight_orig") for m in model.modules())
    return (model if masked else copy.deepcopy(model)).double().eval()


def _masked_copy(model: nn.Module, graph: Graph) -> nn.Module:
    """The reference's masked network: weight = weight_orig * mask with pruned weight_orig zeroed."""
    net = copy.deepcopy(model)
    masks = {p.origin: torch.as_tensor(p.mask_or_ones()) for p in graph.prunable_params()}
    for n, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.mul_(masks[f"{n}.weight"])
            torch_prune.custom_from_mask(m, "weight", masks[f"{n}.weight"])
    return net


def _by_origin(graph: Graph) -> dict[str, str]:
    return {p.origin: p.name for p in graph.prunable_params()}


def _run(graph: Graph, spec: str, data: Batch | None = None, seed: int = 0) -> Graph:
    PassManager(parse_pipeline(spec)).run(graph, AnalysisManager(graph, RunContext(seed=seed, data=data)))
    return graph


def _topk_ref(scores: dict[str, np.ndarray], keep: int) -> dict[str, np.ndarray]:
    """Reference global top-k: stable sort, ties to lower flat index."""
    names = list(scores)
    flat = np.concatenate([scores[n].reshape(-1) for n in names])
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:keep]] = True
    out, offset = {}, 0
    for n in names:
        out[n] = mask[offset : offset + scores[n].size].reshape(scores[n].shape)
        offset += scores[n].size
    return out


# ---- independent reference formulas (plain autograd on the nn.Module) ----------------------
def synflow_ref(model: nn.Module, shape: tuple[int, ...], masks: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    net = _fresh(model)
    with torch.no_grad():
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.abs_()
        for name, w in _weights(net).items():
            if masks is not None:
                w.mul_(masks[name].double())
    net.zero_grad()
    net(torch.ones(1, *shape, dtype=torch.float64)).sum().backward()
    return {n: (w.grad * w).abs().detach().numpy() for n, w in _weights(net).items()}


def snip_ref(model: nn.Module, batch: Batch, batch_size: int) -> dict[str, np.ndarray]:
    net = _fresh(model)
    x, y = torch.as_tensor(batch.x).double(), torch.as_tensor(batch.y)
    for start in range(0, len(y), batch_size):
        F.cross_entropy(net(x[start : start + batch_size]), y[start : start + batch_size]).backward()
    raw = {n: (w.grad * w).abs().detach() for n, w in _weights(net).items()}
    total = sum(t.sum() for t in raw.values())
    return {n: (t / total).numpy() for n, t in raw.items()}


def grasp_ref(model: nn.Module, batch: Batch, temperature: float) -> dict[str, np.ndarray]:
    net = _fresh(model)
    weights = list(_weights(net).values())
    x, y = torch.as_tensor(batch.x).double(), torch.as_tensor(batch.y)
    g = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), weights)
    stopped = [t.detach() for t in g]
    g2 = torch.autograd.grad(F.cross_entropy(net(x) / temperature, y), weights, create_graph=True)
    sum((s * t).sum() for s, t in zip(stopped, g2)).backward()
    raw = {n: (w.grad * w).detach() for n, w in _weights(net).items()}
    norm = torch.abs(sum(t.sum() for t in raw.values())) + 1e-10
    return {n: (t / norm).numpy() for n, t in raw.items()}


def _compare(graph: Graph, got: dict[str, np.ndarray], ref: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    names = _by_origin(graph)
    scale = max(float(np.abs(v).max()) for v in ref.values())
    for origin, expected in ref.items():
        np.testing.assert_allclose(got[names[origin]], expected, rtol=rtol, atol=1e-9 * scale, err_msg=origin)


# ---- scores vs the eager formulas -----------------------------------------------------------
@pytest.mark.parametrize("key", ["conv", "mlp"])
def test_synflow_scores_match_eager(tiny, key: str) -> None:  # type: ignore[no-untyped-def]
    model, path, shape, _ = tiny[key]
    graph = load_onnx_model(path)
    got = SynflowPass(sparsity=0.5).scores(graph, AnalysisManager(graph), graph.prunable_params())
    ref = synflow_ref(model, shape)
    top = max(float(v.max()) for v in ref.values())  # the pass divides by the round's maximum
    _compare(graph, got, {n: v / top for n, v in ref.items()})


@pytest.mark.parametrize("key", ["conv", "mlp"])
def test_snip_scores_and_mask_match_eager(tiny, key: str) -> None:  # type: ignore[no-untyped-def]
    model, path, shape, classes = tiny[key]
    batch = _batch(shape, classes)
    graph = load_onnx_model(path)
    am = AnalysisManager(graph, RunContext(data=batch))
    got = SnipPass(sparsity=0.8, batch_size=7, precision="float64").scores(graph, am, graph.prunable_params())
    ref = snip_ref(model, batch, batch_size=7)
    _compare(graph, got, ref)
    assert math.isclose(sum(float(v.sum()) for v in got.values()), 1.0, rel_tol=1e-9)
    got32 = SnipPass(sparsity=0.8, batch_size=7).scores(graph, am, graph.prunable_params())
    _compare(graph, got32, ref, rtol=2e-3)
    _run(graph, "snip{sparsity=0.8,batch_size=7,precision=float64}", batch)
    total = sum(v.size for v in ref.values())
    expected = _topk_ref(ref, total - math.floor(0.8 * total))
    params = {p.origin: p for p in graph.prunable_params()}
    for origin, mask in expected.items():
        assert np.array_equal(params[origin].mask, mask), origin


@pytest.mark.parametrize("key", ["conv", "mlp"])
def test_grasp_scores_match_eager_signed(tiny, key: str) -> None:  # type: ignore[no-untyped-def]
    model, path, shape, classes = tiny[key]
    batch = _batch(shape, classes)
    graph = load_onnx_model(path)
    am = AnalysisManager(graph, RunContext(data=batch))
    got = GraspPass(sparsity=0.5, temperature=2.0, precision="float64").scores(graph, am, graph.prunable_params())
    ref = grasp_ref(model, batch, temperature=2.0)
    _compare(graph, got, ref)
    flat = np.concatenate([v.reshape(-1) for v in got.values()])
    assert (flat < 0).any() and (flat > 0).any()  # signed, not abs
    _run(graph, "grasp{sparsity=0.5,temperature=2.0,precision=float64}", batch)
    kept = np.concatenate([p.mask.reshape(-1) for p in graph.prunable_params()])
    order = np.concatenate([got[p.name].reshape(-1) for p in graph.prunable_params()])
    assert order[kept].min() >= order[~kept].max()  # the lowest scores are pruned


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_scores_on_a_masked_graph_match_masked_eager(tiny, method: str) -> None:  # type: ignore[no-untyped-def]
    """A second criterion sees the first one's masks as the reference's masked layers do."""
    model, path, shape, classes = tiny["conv"]
    batch = _batch(shape, classes)
    graph = _run(load_onnx_model(path), "magnitude{sparsity=0.5}")
    am = AnalysisManager(graph, RunContext(data=batch))
    net = _masked_copy(model, graph)
    if method == "snip":
        got = SnipPass(sparsity=0.8, precision="float64").scores(graph, am, graph.prunable_params())
        ref = snip_ref(net, batch, batch_size=256)
    else:
        got = GraspPass(sparsity=0.8, temperature=2.0, precision="float64").scores(graph, am, graph.prunable_params())
        ref = grasp_ref(net, batch, temperature=2.0)
    _compare(graph, got, ref)
    for p in graph.prunable_params():
        assert not got[p.name][~p.mask].any()  # pruned weights score 0


def test_grasp_default_temperature_is_reference(tiny) -> None:  # type: ignore[no-untyped-def]
    model, path, shape, classes = tiny["conv"]
    batch = _batch(shape, classes)
    graph = load_onnx_model(path)
    got = GraspPass(sparsity=0.5, precision="float64").scores(graph, AnalysisManager(graph, RunContext(data=batch)), graph.prunable_params())
    _compare(graph, got, grasp_ref(model, batch, temperature=200.0))


# ---- iterative SynFlow: schedules, scopes, exact counts ----------------------------------------
def synflow_loop_ref(model: nn.Module, shape: tuple[int, ...], density: float, rounds: int, schedule: str, layer: bool) -> dict[str, np.ndarray]:
    weights = {n: w.numel() for n, w in _weights(model).items()}
    masks = {n: torch.ones_like(w) for n, w in _weights(model).items()}
    for e in range(rounds):
        scores = synflow_ref(model, shape, masks)
        frac = (e + 1) / rounds
        d_e = density if e == rounds - 1 else density**frac if schedule == "exp" else 1 - (1 - density) * frac

        def count(n: int) -> int:
            return n - math.floor((1 - d_e) * n)

        if layer:
            new = {n: _topk_ref({n: s}, count(weights[n]))[n] for n, s in scores.items()}
        else:
            new = _topk_ref(scores, count(sum(weights.values())))
        masks = {n: torch.as_tensor(m) for n, m in new.items()}
    return {n: m.numpy() for n, m in masks.items()}


@pytest.mark.parametrize(("schedule", "scope"), [("exp", "global"), ("linear", "global"), ("exp", "layer"), ("linear", "layer")])
def test_synflow_iterative_matches_reference_loop(tiny, schedule: str, scope: str) -> None:  # type: ignore[no-untyped-def]
    model, path, shape, _ = tiny["conv"]
    graph = _run(load_onnx_model(path), f"synflow{{sparsity=0.9,iterations=6,schedule={schedule},scope={scope}}}")
    ref = synflow_loop_ref(model, shape, 0.1, 6, schedule, scope == "layer")
    names = _by_origin(graph)
    params = {p.name: p for p in graph.prunable_params()}
    for origin, mask in ref.items():
        assert np.array_equal(params[names[origin]].mask, mask), origin
    if scope == "layer":
        assert all(p.kept() == p.numel - math.floor(0.9 * p.numel) for p in params.values())
    else:
        total = sum(p.numel for p in params.values())
        assert sum(p.kept() for p in params.values()) == total - math.floor(0.9 * total)


def test_schedule_keep_counts() -> None:
    n, keep, d = 10_000, 10, 0.001
    exp = [schedule_keep(n, keep, d, e, 4, "exp") for e in range(4)]
    lin = [schedule_keep(n, keep, d, e, 4, "linear") for e in range(4)]
    assert exp == [n - math.floor((1 - d ** ((e + 1) / 4)) * n) for e in range(3)] + [keep] == [1779, 317, 57, 10]
    assert lin == [n - math.floor((1 - (1 - (1 - d) * (e + 1) / 4)) * n) for e in range(3)] + [keep] == [7503, 5005, 2508, 10]
    assert schedule_keep(n, 0, 0.0, 0, 3, "exp") == 0


def test_topk_mask_torch_matches_numpy() -> None:
    from pai_compiler.passes.criteria.base import topk_mask

    rng = np.random.default_rng(0)
    flat = np.round(rng.random(500), 1)  # many ties
    flat[:5] = np.nan
    for k in (0, 1, 37, 250, 499, 500):
        assert np.array_equal(topk_mask_torch(torch.as_tensor(flat), k).numpy(), topk_mask(flat, k))


def test_synflow_composes_with_erk(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path, _, _ = tiny["conv"]
    graph = load_onnx_model(path)
    records = PassManager(parse_pipeline("erk{sparsity=0.8},synflow{scope=layer,iterations=5}")).run(graph)
    allocation = records[0].report
    assert isinstance(allocation, Allocation) and allocation.source == "erk{sparsity=0.8}"
    assert [p.kept() for p in graph.prunable_params()] == [allocation.keep[p.name] for p in graph.prunable_params()]


def test_synflow_never_leaks_signs(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path, _, _ = tiny["conv"]
    graph = load_onnx_model(path)
    before = {p.name: p.data.copy() for p in graph.params()}
    _run(graph, "synflow{sparsity=0.5,iterations=3}")
    assert all(np.array_equal(p.data, before[p.name]) for p in graph.params())
    assert any((p.data < 0).any() for p in graph.params() if not p.prunable)  # BN shifts/means stay signed


def test_synflow_float32_matches_float64_masks(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path, _, _ = tiny["mlp"]
    a = _run(load_onnx_model(path), "synflow{sparsity=0.7,iterations=4}")
    b = _run(load_onnx_model(path), "synflow{sparsity=0.7,iterations=4,precision=float32}")
    agree = np.mean([np.mean(p.mask == q.mask) for p, q in zip(a.prunable_params(), b.prunable_params())])
    assert agree > 0.99


def test_synflow_resnet20_999_keeps_a_path(examples_dir: Path) -> None:
    """100 rounds at 99.9 % (271 of 270,896 weights): the network stays connected.

    SynFlow's guarantee is about cuts: it never empties a layer every path crosses (the stem
    conv and the classifier here). A residual branch may legitimately empty out, because the
    skip connection carries its flow; the eager Synaptic-Flow loop does the same on this model.
    """
    graph = _run(load_onnx_model(examples_dir / "resnet20.onnx"), "synflow{sparsity=0.999}")
    params = graph.prunable_params()
    assert sum(p.kept() for p in params) == 270_896 - math.floor(0.999 * 270_896)
    assert params[0].kept() >= 1 and params[-1].kept() >= 1
    out = Interpreter(graph, mode="paths", dtype=torch.float64, scaling="exact").run([torch.ones(1, 3, 32, 32, dtype=torch.float64)]).outputs
    assert float(out[0].sum()) > 0


def test_synflow_chain_999_no_layer_collapse(examples_dir: Path) -> None:
    """On a chain (every layer is a cut) at 99.9 %, 20 rounds: every layer keeps a weight; one-shot magnitude does not."""
    graph = _run(load_onnx_model(examples_dir / "vgg_small.onnx"), "synflow{sparsity=0.999,iterations=20}")
    assert all(p.kept() >= 1 for p in graph.prunable_params())
    out = Interpreter(graph, mode="paths", dtype=torch.float64, scaling="exact").run([torch.ones(1, 3, 32, 32, dtype=torch.float64)]).outputs
    assert float(out[0].sum()) > 0
    magnitude = _run(load_onnx_model(examples_dir / "vgg_small.onnx"), "magnitude{sparsity=0.999}")
    assert any(p.kept() == 0 for p in magnitude.prunable_params())


# ---- data-driven criteria need data ---------------------------------------------------------
@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_data_driven_without_data_is_a_usage_error(tiny, method: str) -> None:  # type: ignore[no-untyped-def]
    _, path, _, _ = tiny["conv"]
    graph = load_onnx_model(path)
    with pytest.raises(PaicError, match=r"pass --data FILE\.npz") as info:
        _run(graph, f"{method}{{sparsity=0.5}}")
    assert info.value.exit_code == UsageError.exit_code
    assert all(p.mask is None for p in graph.prunable_params())


def test_data_shape_mismatch_is_a_usage_error(tiny) -> None:  # type: ignore[no-untyped-def]
    _, path, _, classes = tiny["conv"]
    with pytest.raises(PaicError, match="data samples have shape"):
        _run(load_onnx_model(path), "snip{sparsity=0.5}", _batch((3, 6, 6), classes))


@pytest.mark.parametrize("spec", ["synflow{sparsity=0.5}", "snip{sparsity=0.5}", "grasp{sparsity=0.5}"])
def test_cuda_without_gpu_is_a_usage_error(tiny, spec: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same error on a machine with a GPU
    _, path, shape, classes = tiny["conv"]
    graph = load_onnx_model(path)
    am = AnalysisManager(graph, RunContext(device="cuda", data=_batch(shape, classes)))
    with pytest.raises(PaicError, match="no CUDA device") as info:
        PassManager(parse_pipeline(spec)).run(graph, am)
    assert info.value.exit_code == UsageError.exit_code


# ---- random-ERK, magnitude, determinism -------------------------------------------------------
def test_random_erk_equals_erk_then_layerwise_random(examples_dir: Path) -> None:
    a = _run(load_onnx_model(examples_dir / "resnet20.onnx"), "random-erk{sparsity=0.99,seed=3}")
    b = _run(load_onnx_model(examples_dir / "resnet20.onnx"), "erk{sparsity=0.99},random{scope=layer,seed=3}")
    c = _run(load_onnx_model(examples_dir / "resnet20.onnx"), "erk{sparsity=0.99},random-erk", seed=3)
    d = _run(load_onnx_model(examples_dir / "resnet20.onnx"), "random-erk{sparsity=0.99,seed=4}")
    assert [p.kept() for p in a.prunable_params()] == [42] + [63] * 6 + [89, 115, 83] + [115] * 4 + [168, 220, 161] + [220] * 4 + [122]
    for p, q, r, s in zip(a.prunable_params(), b.prunable_params(), c.prunable_params(), d.prunable_params()):
        assert np.array_equal(p.mask, q.mask) and np.array_equal(p.mask, r.mask)
        assert p.kept() == s.kept()
    assert any(not np.array_equal(p.mask, s.mask) for p, s in zip(a.prunable_params(), d.prunable_params()))


def test_random_erk_needs_a_budget(tiny) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PaicError, match="give a sparsity"):
        _run(load_onnx_model(tiny["conv"][1]), "random-erk")


def test_magnitude_respects_existing_masks(tiny) -> None:  # type: ignore[no-untyped-def]
    graph = _run(load_onnx_model(tiny["mlp"][1]), "magnitude{sparsity=0.5},magnitude{sparsity=0.7}")
    first = _run(load_onnx_model(tiny["mlp"][1]), "magnitude{sparsity=0.5}")
    for p, q in zip(graph.prunable_params(), first.prunable_params()):
        assert not (p.mask & ~q.mask).any()  # pruned weights score 0 and stay pruned


@pytest.mark.parametrize("spec", ["synflow{sparsity=0.9,iterations=5}", "snip{sparsity=0.9}", "grasp{sparsity=0.9}"])
def test_same_seed_same_masks(tiny, spec: str) -> None:  # type: ignore[no-untyped-def]
    _, path, shape, classes = tiny["conv"]
    masks = []
    for _ in range(2):
        graph = _run(load_onnx_model(path), spec, _batch(shape, classes, seed=5))
        masks.append([p.mask for p in graph.prunable_params()])
    assert all(np.array_equal(a, b) for a, b in zip(*masks))


# ---- the prune-batch loader -----------------------------------------------------------------
@pytest.fixture(scope="module")
def npz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [30, 20, 12]).astype(np.uint8)
    rng.shuffle(y)
    x = rng.integers(0, 256, size=(y.size, 6, 6, 3), dtype=np.uint8)  # NHWC
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    return path


def test_loader_balanced_deterministic_normalised(npz_file: Path) -> None:
    a = load_prune_batch(npz_file, samples_per_class=7, seed=1, input_shape=(3, 6, 6))
    b = load_prune_batch(npz_file, samples_per_class=7, seed=1)
    c = load_prune_batch(npz_file, samples_per_class=7, seed=2)
    assert a.x.shape == (21, 3, 6, 6) and a.x.dtype == np.float32 and a.y.dtype == np.int64
    assert np.bincount(a.y).tolist() == [7, 7, 7]
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    with np.load(npz_file) as raw:
        pixels = raw["x_train"].astype(np.float64) / 255
    mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    np.testing.assert_allclose(a.meta["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(a.meta["std"], std, rtol=1e-9)
    given = load_prune_batch(npz_file, samples_per_class=7, seed=1, mean=0.5, std=0.25)
    np.testing.assert_allclose(given.x * 0.25 + 0.5, a.x * std.reshape(1, 3, 1, 1) + mean.reshape(1, 3, 1, 1), atol=1e-5)


def test_loader_errors(npz_file: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_prune_batch(tmp_path / "missing.npz")
    np.savez(tmp_path / "nokeys.npz", images=np.zeros((2, 3)))
    with pytest.raises(UsageError, match=r"no 'x_train' or 'y_train' \(keys: images\)"):
        load_prune_batch(tmp_path / "nokeys.npz")
    with pytest.raises(UsageError, match="the model expects"):
        load_prune_batch(npz_file, input_shape=(3, 8, 8))
    with pytest.raises(UsageError, match="fewer than --samples 13"):
        load_prune_batch(npz_file, samples_per_class=13)
    with pytest.raises(UsageError, match="the model has 2 outputs"):
        load_prune_batch(npz_file, num_classes=2)
    with pytest.raises(UsageError, match="input shape"):
        load_prune_batch("random")


def test_loader_random_and_graph_checks(tiny) -> None:  # type: ignore[no-untyped-def]
    graph = load_onnx_model(tiny["conv"][1])
    batch = load_batch_for(graph, "random", samples_per_class=3, seed=0)
    assert batch.x.shape == (15, 3, 8, 8) and np.bincount(batch.y).tolist() == [3] * 5
    assert np.array_equal(batch.x, load_batch_for(graph, "random", samples_per_class=3, seed=0).x)
    _run(graph, "snip{sparsity=0.9}", batch)
    assert sum(p.kept() for p in graph.prunable_params()) > 0


def test_loader_mnist(data_dir: Path) -> None:
    path = data_dir / "mnist.npz"
    batch = load_prune_batch(path, samples_per_class=10, seed=0, input_shape=(1, 28, 28))
    assert batch.x.shape == (100, 1, 28, 28) and np.bincount(batch.y).tolist() == [10] * 10
    pixels = np.load(path)["x_train"].astype(np.float64) / 255.0  # the whole training set's statistics
    np.testing.assert_allclose(batch.meta["mean"], [pixels.mean()], atol=1e-4)
    np.testing.assert_allclose(batch.meta["std"], [pixels.std()], atol=1e-4)
    flat = load_prune_batch(path, samples_per_class=2, seed=0, input_shape=(784,))
    assert flat.x.shape == (20, 784)


def test_api_optimize_takes_data_as_the_cli_does() -> None:
    """``data="random"`` (or an .npz path) through the Python API, as ``--data``: the same masks as a batch loaded first."""
    from pai_compiler.api import load_model, optimize
    from pai_compiler.lab.data import load_batch_for

    model = Path(__file__).resolve().parents[1] / "examples" / "models" / "vgg_small.onnx"
    by_name = optimize(model, sparsity=0.9, method="snip", data="random", seed=3).masks
    batch = load_batch_for(load_model(model), "random", seed=3)
    loaded = optimize(model, sparsity=0.9, method="snip", data=batch, seed=3).masks
    assert by_name.keys() == loaded.keys() and all(np.array_equal(by_name[k], loaded[k]) for k in by_name)
