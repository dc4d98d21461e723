"""Training pruned models: masks hold under SGD (momentum, weight decay), under DDP, and MNIST learns."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pai_compiler
from pai_compiler.lab import zoo
from pai_compiler.lab.training import Dataset, load_dataset, masked_nonzero, train


def _random_masks(model: nn.Module, density: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2 or name.endswith("in_proj_weight"):
            masks[name] = torch.rand(p.shape, generator=g) < density
    return masks


def _synthetic(shape: tuple[int, ...], n: int = 64, classes: int = 10, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    channels = shape[0]
    return Dataset("synthetic", x, y, x[:16], y[:16], (0.5,) * channels, (0.25,) * channels, augment=channels == 3)


def _effective(model: nn.Module, fqn: str) -> torch.Tensor:
    owner, _, name = fqn.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


@pytest.mark.parametrize("name", ["vgg_small", "tiny_vit"])
def test_masks_stay_zero_under_momentum_and_weight_decay(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build(name)
    masks = _random_masks(model)
    pai_compiler.PruneResult(masks, {}, "test", None).apply(model)
    assert "blocks.0.attn.in_proj_weight" in masks or name != "tiny_vit"
    out = train(model, None, _synthetic((3, 32, 32)), epochs=2, lr=0.1, batch_size=16, progress=False, milestones=[1])
    assert out["masked_nonzero"] == 0 and masked_nonzero(model) == 0
    assert [h["lr"] for h in out["history"]] == [0.1, pytest.approx(0.01)]
    for fqn, mask in masks.items():
        w = _effective(model, fqn)
        assert torch.all(w[~mask] == 0), fqn
        assert torch.any(w[mask] != 0), fqn
        owner = model.get_submodule(fqn.rpartition(".")[0])
        orig = getattr(owner, fqn.rpartition(".")[2] + "_orig")
        assert torch.any(orig[~mask] != 0)  # weight decay moved the hidden weights, the mask still wins
    from torch.nn.utils import prune

    for fqn in masks:
        owner, _, pname = fqn.rpartition(".")
        prune.remove(model.get_submodule(owner), pname)
    for fqn, mask in masks.items():
        w = _effective(model, fqn)
        assert isinstance(w, nn.Parameter) and torch.all(w[~mask] == 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = zoo.build("lenet300")
        masks = _random_masks(model, 0.2)
        result = train(model, masks, _synthetic((1, 28, 28), n=96, seed=rank), epochs=1, lr=0.1, batch_size=16, progress=False)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        zeros_hold = all(bool(torch.all(_effective(model, k)[~m] == 0)) for k, m in masks.items())
        torch.save({"masked_nonzero": result["masked_nonzero"], "zeros_hold": zeros_hold, "params": flat}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_masks_stay_zero_under_ddp(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in results:
        assert r["masked_nonzero"] == 0 and r["zeros_hold"]
    torch.testing.assert_close(results[0]["params"], results[1]["params"])  # DDP kept the replicas in sync


def test_lenet300_mnist_smoke(data_dir: Path) -> None:
    data = load_dataset("mnist", data_dir, limit_train=10_000, limit_test=2_000)
    assert data.input_shape == (1, 28, 28) and not data.augment
    torch.manual_seed(0)
    model = zoo.build("lenet300")
    result = pai_compiler.prune(model, torch.randn(2, 1, 28, 28), sparsity=0.9, method="magnitude", report=False)
    assert result.density == pytest.approx(0.1, abs=1e-3)
    out = train(model, result.masks, data, epochs=3, lr=0.1, progress=False)
    assert out["masked_nonzero"] == 0
    assert out["test_accuracy"] > 0.8, out["history"]


def test_example_train_cli(data_dir: Path, tmp_path: Path, capsys: Any) -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("paic_example_train", Path(__file__).resolve().parents[1] / "examples" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = tmp_path / "history.json"
    code = module.main(["--dataset", "mnist", "--epochs", "1", "--limit-train", "1024", "--limit-test", "256", "--method", "random",
                        "--data-dir", str(data_dir), "--device", "cpu", "--no-progress", "--json", str(report)])
    assert code == 0
    doc = json.loads(report.read_text())
    assert doc["masked_nonzero"] == 0 and doc["density"] == pytest.approx(0.1, abs=1e-3) and len(doc["history"]) == 1
    assert "final test accuracy" in capsys.readouterr().out
