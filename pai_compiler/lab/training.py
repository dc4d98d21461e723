"""Train a pruned model: SGD (momentum 0.9, weight decay 1e-4), step decay, per-epoch test accuracy.

Masks are attached with ``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask``), so
the pruned weights stay exactly zero whatever the optimiser does to ``weight_orig``. Under
``torch.distributed`` (e.g. ``torchrun`` or ``mp.spawn`` with gloo/nccl) every rank trains on
its shard of each epoch's permutation inside ``DistributedDataParallel``. Data are the
``.npz`` archives of ``<repo>/../shared/data`` (``x_train``, ``y_train``, ``x_test``,
``y_test``, uint8), kept as uint8 and normalised per batch; CIFAR batches get random-crop
(pad 4) and horizontal-flip augmentation.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pai_compiler.backends.torch_backend import attach_masks
from pai_compiler.errors import PaicError
from pai_compiler.progress import progress_bar

__all__ = ["Dataset", "default_data_dir", "load_dataset", "train", "evaluate", "masked_nonzero", "prepare_batch", "NORMALISATION"]

#: per-channel (mean, std) of the training set, pixels in [0, 1]
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass
class Dataset:
    """Images as uint8 NCHW tensors plus labels; ``mean``/``std`` normalise pixels / 255."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def default_data_dir() -> Path:
    """``$PAIC_DATA_DIR``, else ``<repo>/../shared/data``, else ``./../shared/data``."""
    env = os.environ.get("PAIC_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    candidate = repo.parent / "shared" / "data"
    return candidate if candidate.is_dir() else Path.cwd().parent / "shared" / "data"


def _nchw(x: np.ndarray) -> torch.Tensor:
    if x.ndim == 3:  # (N, H, W) grey
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # NHWC
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(x))


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, limit_train: int | None = None,
                 limit_test: int | None = None, augment: bool | None = None) -> Dataset:
    """Load ``mnist``/``cifar10`` (or an .npz path) keeping the first ``limit_*`` samples."""
    path = Path(name) if str(name).endswith(".npz") else Path(data_dir or default_data_dir()) / f"{name}.npz"
    if not path.is_file():
        raise PaicError(f"dataset {path} not found (set --data-dir or PAIC_DATA_DIR)")
    key = path.stem.lower()
    with np.load(path) as archive:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
        if missing:
            raise PaicError(f"{path}: missing arrays {', '.join(sorted(missing))}")
        x_train, y_train = archive["x_train"][:limit_train], archive["y_train"][:limit_train]
        x_test, y_test = archive["x_test"][:limit_test], archive["y_test"][:limit_test]
    x_tr, x_te = _nchw(x_train), _nchw(x_test)
    channels = x_tr.shape[1]
    mean, std = NORMALISATION.get(key, ((0.5,) * channels, (0.5,) * channels))
    return Dataset(key, x_tr, torch.from_numpy(y_train.astype(np.int64)), x_te, torch.from_numpy(y_test.astype(np.int64)),
                   mean, std, augment=key.startswith("cifar") if augment is None else augment)


def prepare_batch(x: torch.Tensor, data: Dataset, device: torch.device, augment: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Pixels on ``device`` normalised to (x / 255 - mean) / std; ``augment``: random crop (pad 4) and flip."""
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if augment:
        n, _, h, w = x.shape
        padded = F.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n,), generator=generator).tolist()
        dx = torch.randint(0, 9, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        flip = (torch.rand(n, generator=generator) < 0.5).to(device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def masked_nonzero(model: nn.Module) -> int:
    """Number of nonzero effective weights at masked (pruned) positions: 0 when masks hold."""
    count = 0
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if name.endswith("_mask"):
                weight = getattr(module, name[: -len("_mask")])
                count += int(((buf == 0) & (weight != 0)).sum())
    return count


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: str | torch.device = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy on the test split."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data.y_test), batch_size):
        x = prepare_batch(data.x_test[start : start + batch_size], data, device, False, None)
        y = data.y_test[start : start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(data.y_test))


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int,
               milestones: Sequence[int] | None, gamma: float, warmup_steps: int) -> Any:
    """Step decay at ``milestones`` (stepped per epoch) or warm-up then cosine (stepped per batch)."""
    if schedule not in ("step", "cosine"):
        raise PaicError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
    if warmup_steps and schedule != "cosine":
        raise PaicError("warmup_steps needs schedule='cosine'")
    if schedule == "cosine":
        warm = max(0, int(warmup_steps))
        decay = max(1, epochs * steps_per_epoch - warm)

        def factor(t: int) -> float:
            if t < warm:
                return (t + 1) / (warm + 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(t - warm, decay) / decay))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if milestones is None:
        milestones = [int(epochs * 0.5), int(epochs * 0.75)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, sorted({m for m in milestones if 0 < m < epochs}), gamma)


@dataclass
class _TrainingRun:
    """What every epoch of one :func:`train` call shares, and the batches taken so far."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_batch: bool
    data: Dataset
    device: torch.device
    generator: torch.Generator
    batch_size: int
    rank: int
    world: int
    epochs: int
    steps_per_epoch: int
    max_steps: int | None
    bar: Any
    task: Any = None
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def out_of_steps(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps


def _train_epoch(run: _TrainingRun, epoch: int) -> tuple[float, int, int]:
    """One pass over this rank's shard of a fresh permutation: (summed loss, correct, samples seen)."""
    run.net.train()
    data = run.data
    order = torch.randperm(len(data.y_train), generator=run.generator)[run.rank :: run.world]
    loss_sum, correct, seen = 0.0, 0, 0
    for b in range(0, len(order), run.batch_size):
        idx = order[b : b + run.batch_size]
        x = prepare_batch(data.x_train[idx], data, run.device, data.augment, run.generator)
        y = data.y_train[idx].to(run.device)
        run.optimizer.zero_grad(set_to_none=True)
        out = run.net(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        run.optimizer.step()
        if run.per_batch:
            run.scheduler.step()
        loss_sum += loss.item() * len(idx)
        correct += int((out.argmax(1) == y).sum())
        seen += len(idx)
        run.step += 1
        if run.task is not None:
            run.bar.update(run.task, advance=1, description=f"epoch {epoch}/{run.epochs} loss {loss_sum / seen:.3f}")
        if run.out_of_steps:
            break
    return loss_sum, correct, seen


def _run_epochs(run: _TrainingRun, model: nn.Module, progress: bool) -> None:
    """Train epoch after epoch, evaluating after each, until ``epochs`` or ``max_steps``."""
    with run.bar:
        run.task = run.bar.add_task("train", total=run.epochs * run.steps_per_epoch)
        for epoch in range(1, run.epochs + 1):
            start = time.perf_counter()
            lr_now = run.optimizer.param_groups[0]["lr"]
            loss_sum, correct, seen = _train_epoch(run, epoch)
            if not run.per_batch:
                run.scheduler.step()
            test_acc = evaluate(model, run.data, run.device)
            row = {"epoch": epoch, "lr": lr_now, "train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen),
                   "test_accuracy": test_acc, "seconds": time.perf_counter() - start}
            run.history.append(row)
            if run.rank == 0 and progress:
                run.bar.console.print(f"epoch {epoch:3d}  lr {lr_now:.4g}  loss {row['train_loss']:.4f}  "
                                      f"train {100 * row['train_accuracy']:.2f}%  test {100 * test_acc:.2f}%  ({row['seconds']:.1f} s)")
            if run.out_of_steps:
                break


def train(
    model: nn.Module,
    masks: Mapping[str, Any] | None,
    data: Dataset,
    epochs: int,
    lr: float = 0.1,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    schedule: str = "step",
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """Train ``model`` with ``masks`` attached (None: already attached or dense); return the history.

    Step decay: lr x ``gamma`` at ``milestones`` (default 50% and 75% of ``epochs``);
    ``schedule="cosine"``: lr x (1 + cos(pi t / T)) / 2, stepped every batch (``milestones`` unused),
    after a linear warm-up over the first ``warmup_steps`` batches (cosine only).
    Returns ``{"history": [{epoch, lr, train_loss, train_accuracy, test_accuracy, seconds}],
    "test_accuracy", "best_test_accuracy", "masked_nonzero", "train_samples", "seconds"}``.
    """
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(device)
    if masks:
        attach_masks(model, masks)
    model.to(device)
    rank, world = _distributed()
    net: nn.Module = model
    if world > 1 and not isinstance(model, DistributedDataParallel):
        net = DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(math.ceil(n / world) / batch_size)
    scheduler = _scheduler(optimizer, schedule, epochs, steps_per_epoch, milestones, gamma, warmup_steps)
    start_all = time.perf_counter()
    run = _TrainingRun(net, optimizer, scheduler, schedule == "cosine", data, device, generator, batch_size, rank, world,
                       epochs, steps_per_epoch, max_steps, progress_bar(progress and rank == 0))
    _run_epochs(run, model, progress)
    accs = [h["test_accuracy"] for h in run.history]
    return {"history": run.history, "test_accuracy": accs[-1] if accs else None, "best_test_accuracy": max(accs) if accs else None,
            "masked_nonzero": masked_nonzero(model), "train_samples": n, "seconds": time.perf_counter() - start_all}
