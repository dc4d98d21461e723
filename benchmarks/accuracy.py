"""Accuracy benchmark: prune at initialisation with every method, train on real data, test.

Grid = methods x sparsities x seeds per (dataset, model). Each run: build the zoo model
(``torch.manual_seed(seed)``), prune it with ``pai_compiler.prune`` (ERK allocation, the
method as criterion; SNIP/GraSP get 10 training images per class from
``pai_compiler.lab.data.load_prune_batch``), train it with ``pai_compiler.lab.training.train``
(identical hyperparameters for every method), and record the final test accuracy.

Resumable: every finished run is one JSON file under ``docs/results/runs/``; a rerun skips
runs whose file exists, and parallel workers on one results folder claim runs with lock files.
A run on a GPU (``--device cuda``) has its own file (``..._cuda.json``) and its own table, so
GPU runs never stand in for CPU runs or are pooled with them.
Runs are ordered seed-major (all methods and sparsities of seed 0 first) so a partial budget
(``--max-minutes``) still fills every cell once. ``benchmarks/accuracy_report.py`` turns the
files into ``docs/results/accuracy.md`` and ``accuracy.png``.

    python benchmarks/accuracy.py --dry-run                         # what would run, what exists
    nice -n 19 python benchmarks/accuracy.py --suite mnist --max-minutes 70
    python benchmarks/accuracy.py --suite cifar --schedule paper --device cuda   # 160 epochs, GPU owners
    python benchmarks/accuracy.py --suite mnist --models lenet300 --methods dpai,snip --seeds 0 --epochs 1

Schedules (SGD, momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 for every model):
``short`` = 200 batches of linear warm-up, then cosine decay per batch, over a few epochs
(LeNet-300-100: 5, LeNet-5-Caffe: 2, ResNet-20: 8; chosen to fit a CPU budget);
``paper`` = 160 epochs, lr x0.1 at epochs 80 and 120, no warm-up (the DPaI/Synaptic-Flow
CIFAR recipe; used for the MNIST models as well).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "docs" / "results" / "runs"

#: candidate criteria in report order; the ones registered in this install are used
KNOWN_METHODS = ("random-erk", "magnitude", "snip", "grasp", "synflow", "npb", "dpai", "autosparse")
#: named variants of a criterion (a method name with options): the latency knob's settings
METHOD_VARIANTS = {"dpai-lat50": "dpai{latency=0.5}", "dpai-lat100": "dpai{latency=1.0}"}
#: criteria that read the prune batch (they all get it; these are the ones that need it)
DATA_DRIVEN = frozenset({"snip", "grasp", "autosparse"})
#: slow criteria: by default they run only for the first ``--slow-seeds`` seeds of each cell (none
#: since NPB solves linear layers exactly: its prune takes < 1 s on LeNet, ~10 s on ResNet-20)
SLOW_METHODS: frozenset[str] = frozenset()
SAMPLES_PER_CLASS = 10
#: linear lr warm-up (batches) of the short schedule: without it DPaI's LeNet-5 masks diverge
#: (NaN loss near batch 50) at lr 0.1, while the random/ERK masks need lr 0.1 to get going at all;
#: capped at a quarter of the run's batches (smoke runs)
SHORT_WARMUP = 200


@dataclass(frozen=True)
class Suite:
    """One (dataset, model) block of the grid and its short-schedule epochs."""

    dataset: str
    model: str
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    short_epochs: int
    #: rough cost on one CPU core shared at nice 19 (seconds per epoch incl. test; seconds per prune), measured
    epoch_seconds: float
    prune_seconds: dict[str, float] = field(default_factory=dict)


SUITES: dict[str, list[Suite]] = {
    "mnist": [
        Suite("mnist", "lenet300", (0.95, 0.98, 0.99, 0.995), (0, 1, 2), 5, 10.0,
              {"dpai": 45.0, "npb": 1.0, "synflow": 2.0, "random-erk": 0.6}),
        Suite("mnist", "lenet5", (0.98, 0.99), (0, 1, 2), 2, 85.0,
              {"dpai": 60.0, "npb": 1.0, "synflow": 5.0, "random-erk": 0.8}),
    ],
    "cifar": [
        Suite("cifar10", "resnet20", (0.90, 0.99), (0, 1), 8, 320.0,
              {"dpai": 400.0, "npb": 15.0, "synflow": 10.0, "random-erk": 2.0}),
    ],
}


@dataclass(frozen=True)
class Schedule:
    name: str
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    kind: str  # "cosine" (per batch) or "step"
    epochs: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0

    def describe(self) -> str:
        if self.kind == "cosine":
            return (f"{self.epochs} ep, SGD lr {self.lr:g}, {self.warmup_steps}-batch linear warm-up then cosine per batch, "
                    f"mom {self.momentum:g}, wd {self.weight_decay:g}, bs {self.batch_size}")
        drops = "/".join(str(m) for m in self.milestones)
        return (f"{self.epochs} ep, SGD lr {self.lr:g} x{self.gamma:g} at {drops}, mom {self.momentum:g}, "
                f"wd {self.weight_decay:g}, bs {self.batch_size}")


def make_schedule(name: str, suite: Suite, epochs: int | None = None) -> Schedule:
    """``short``: warm-up + cosine over the suite's few epochs; ``paper``: 160 epochs, drops at 80/120."""
    if name == "short":
        return Schedule("short", 0.1, 0.9, 1e-4, 128, "cosine", epochs or suite.short_epochs, warmup_steps=SHORT_WARMUP)
    if name == "paper":
        e = epochs or 160
        return Schedule("paper", 0.1, 0.9, 1e-4, 128, "step", e, (e // 2, (3 * e) // 4))
    raise SystemExit(f"--schedule must be short or paper, got {name!r}")


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    model: str
    method: str
    sparsity: float
    seed: int
    schedule: Schedule
    limit_train: int | None = None
    #: torch device of the run (``cpu``, ``cuda``, ``cuda:1``); its kind is part of the file name
    device: str = "cpu"

    @property
    def key(self) -> str:
        sp = f"{100 * self.sparsity:g}".replace(".", "p")
        limit = f"_n{self.limit_train}" if self.limit_train else ""
        kind = self.device.split(":")[0]
        on = "" if kind == "cpu" else f"_{kind}"  # a GPU run never stands in for (or skips) a CPU run
        return (f"{self.dataset}_{self.model}_{self.method}_sp{sp}_seed{self.seed}_"
                f"{self.schedule.name}{self.schedule.epochs}ep{limit}{on}")

    def label(self) -> str:
        return f"{self.model} {self.method} {100 * self.sparsity:g}% seed {self.seed}"


def available_methods() -> list[str]:
    from pai_compiler.registry import available_passes

    have = set(available_passes())
    return [m for m in KNOWN_METHODS if m in have]


def build_grid(suites: Sequence[Suite], methods: Sequence[str], schedule: str, *, sparsities: Sequence[float] | None = None,
               seeds: Sequence[int] | None = None, epochs: int | None = None, limit_train: int | None = None,
               slow_seeds: int = 1, device: str = "cpu") -> list[RunSpec]:
    """Runs in priority order: suite, then seed, then sparsity, then method; the slow methods (if any)
    come after all the others of their suite, for the first ``slow_seeds`` seeds only."""
    specs: list[RunSpec] = []
    fast = [m for m in methods if m not in SLOW_METHODS]
    slow = [m for m in methods if m in SLOW_METHODS]
    for suite in suites:
        sched = make_schedule(schedule, suite, epochs)
        seed_list = list(seeds) if seeds is not None else list(suite.seeds)
        sp_list = list(sparsities) if sparsities is not None else list(suite.sparsities)
        for group, seed_group in ((fast, seed_list), (slow, seed_list[:slow_seeds])):
            for seed in seed_group:
                for sparsity in sp_list:
                    for method in group:
                        specs.append(RunSpec(suite.dataset, suite.model, method, float(sparsity), int(seed), sched,
                                             limit_train, device=device))
    return specs


def suite_of(dataset: str, model: str) -> Suite | None:
    """The grid block of (dataset, model), if the default grid has one."""
    return next((s for group in SUITES.values() for s in group if (s.dataset, s.model) == (dataset, model)), None)


def estimate_seconds(spec: RunSpec) -> float:
    suite = suite_of(spec.dataset, spec.model)
    if suite is None:
        return 60.0
    fraction = 1.0
    if spec.limit_train:
        fraction = min(1.0, spec.limit_train / (60000 if spec.dataset == "mnist" else 50000))
    return suite.epoch_seconds * fraction * spec.schedule.epochs + suite.prune_seconds.get(spec.method, 0.5)


# --------------------------------------------------------------------------------------------
# provenance

_GIT: dict[str, Any] = {}


def git_info() -> dict[str, Any]:
    if not _GIT:
        def run(*args: str) -> str:
            try:
                return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""

        # PAIC_COMMIT: for a copy of the tree whose .git is missing or stale (a rented GPU machine)
        _GIT["commit"] = os.environ.get("PAIC_COMMIT") or run("rev-parse", "HEAD") or None
        _GIT["dirty"] = bool(run("status", "--porcelain", "--untracked-files=no"))
    return dict(_GIT)


# --------------------------------------------------------------------------------------------
# one run

_DATA: dict[tuple[str, str, int | None], Any] = {}


def _dataset(name: str, data_dir: Path, limit_train: int | None) -> Any:
    from pai_compiler.lab.training import load_dataset

    key = (name, str(data_dir), limit_train)
    if key not in _DATA:
        _DATA.clear()  # one dataset at a time (CIFAR-10 is ~180 MB as uint8)
        _DATA[key] = load_dataset(name, data_dir, limit_train=limit_train)
    return _DATA[key]


def result_path(results_dir: Path, spec: RunSpec) -> Path:
    return Path(results_dir) / f"{spec.key}.json"


def prune_for_run(spec: RunSpec, shape: tuple[int, ...], data_dir: Path, *, pipeline: str | None = None) -> tuple[Any, Any, float]:
    """The run's model (``torch.manual_seed(seed)``, zoo) and its masks from ``pai_compiler.prune`` (ERK + the
    method, or ``pipeline`` instead), before training: (model, PruneResult, prune seconds); masks not attached.

    ``benchmarks/latency_accuracy.py`` rebuilds a run's mask with this same recipe."""
    import torch

    import pai_compiler
    from pai_compiler.lab import zoo
    from pai_compiler.lab.data import load_prune_batch
    from pai_compiler.lab.training import NORMALISATION

    mean, std = NORMALISATION[spec.dataset]
    batch = load_prune_batch(Path(data_dir) / f"{spec.dataset}.npz", samples_per_class=SAMPLES_PER_CLASS, seed=spec.seed,
                             input_shape=shape, num_classes=10, mean=mean, std=std)
    torch.manual_seed(spec.seed)
    model = zoo.build(spec.model, num_classes=10)
    pipeline = pipeline or variant_pipeline(spec)
    t0 = time.perf_counter()
    pruned = pai_compiler.prune(model, torch.randn(2, *shape), sparsity=None if pipeline else spec.sparsity, method=spec.method,
                                allocation="erk", pipeline=pipeline, seed=spec.seed, device=spec.device, data=batch, report=False)
    return model, pruned, time.perf_counter() - t0


def variant_pipeline(spec: RunSpec) -> str | None:
    """The pipeline of a named variant (``METHOD_VARIANTS``): ERK at the run's sparsity, then the options; None for a plain method."""
    variant = METHOD_VARIANTS.get(spec.method)
    return None if variant is None else f"erk{{sparsity={spec.sparsity}}},{variant}"


def run_one(spec: RunSpec, results_dir: Path, *, data_dir: Path | None = None, threads: int = 1,
            progress: bool = False) -> dict[str, Any]:
    """Prune, train and test one configuration; write and return its JSON record."""
    import torch

    import pai_compiler
    from pai_compiler.api import build_passes
    from pai_compiler.pipeline import format_pipeline
    from pai_compiler.lab.training import default_data_dir, train

    device = spec.device
    torch.set_num_threads(threads)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    data = _dataset(spec.dataset, data_dir, spec.limit_train)
    shape = tuple(data.input_shape)
    model, pruned, prune_seconds = prune_for_run(spec, shape, data_dir)
    density = pruned.density
    pruned.apply(model)
    del pruned

    sched = spec.schedule
    total_steps = sched.epochs * math.ceil(len(data.y_train) / sched.batch_size)
    warmup = min(sched.warmup_steps, total_steps // 4)  # short smoke runs: at most a quarter of training
    out = train(model, None, data, sched.epochs, sched.lr, momentum=sched.momentum, weight_decay=sched.weight_decay,
                batch_size=sched.batch_size, milestones=list(sched.milestones) or None, gamma=sched.gamma, device=device,
                seed=spec.seed, threads=threads, progress=progress, schedule=sched.kind, warmup_steps=warmup)
    hist = out["history"]
    git = git_info()
    record = {
        "dataset": spec.dataset, "model": spec.model, "method": spec.method, "sparsity": spec.sparsity, "seed": spec.seed,
        "epochs": sched.epochs, "schedule": sched.name, "schedule_detail": asdict(sched), "schedule_text": sched.describe(), "warmup_steps": warmup,
        "test_accuracy": out["test_accuracy"], "best_test_accuracy": out["best_test_accuracy"],
        "final_train_loss": hist[-1]["train_loss"] if hist else None,
        "final_train_accuracy": hist[-1]["train_accuracy"] if hist else None,
        "prune_seconds": prune_seconds, "train_seconds": out["seconds"], "threads": threads, "device": device,
        "commit": git["commit"], "commit_dirty": git["dirty"], "paic_version": pai_compiler.__version__,
        "pipeline": variant_pipeline(spec) or format_pipeline(build_passes(method=spec.method, sparsity=spec.sparsity, allocation="erk")),
        "allocation": "erk",
        "density": density,
        "masked_nonzero": out["masked_nonzero"], "train_samples": out["train_samples"], "test_samples": int(len(data.y_test)),
        "limit_train": spec.limit_train,
        "prune_data": {"samples_per_class": SAMPLES_PER_CLASS, "seed": spec.seed, "source": f"{spec.dataset}.npz x_train",
                       "used_by_method": spec.method in DATA_DRIVEN},
        "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "history": hist,
    }
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(results_dir, spec)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return record


# --------------------------------------------------------------------------------------------
# claiming runs (several workers may share one results folder)

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(results_dir: Path, spec: RunSpec) -> Path | None:
    """A lock file for ``spec``, or None when a live worker holds it (stale locks are taken over)."""
    locks = Path(results_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = locks / f"{spec.key}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return lock
    return None


def release(lock: Path | None) -> None:
    if lock is not None:
        lock.unlink(missing_ok=True)
        try:
            lock.parent.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# the grid

def run_grid(specs: Sequence[RunSpec], results_dir: Path, *, data_dir: Path | None = None, threads: int = 1,
             max_minutes: float | None = None, progress: bool = True, console: Any = None) -> dict[str, list[str]]:
    """Run every spec without a result file; returns {"ran", "skipped", "claimed", "failed", "not_started"} keys."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console(width=None if sys.stdout.isatty() else 160)  # log files: one line per run
    results_dir = Path(results_dir)
    status: dict[str, list[str]] = {"ran": [], "skipped": [], "claimed": [], "failed": [], "not_started": []}
    pending = []
    for spec in specs:
        if result_path(results_dir, spec).exists():
            status["skipped"].append(spec.key)
        else:
            pending.append(spec)
    if status["skipped"]:
        console.print(f"{len(status['skipped'])} run(s) already done in {results_dir}, {len(pending)} to go")
    start = time.monotonic()
    total = sum(estimate_seconds(s) for s in pending) or 1.0
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[done]}"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("accuracy grid", total=total, done=f"0/{len(pending)}")
        for i, spec in enumerate(pending):
            elapsed_min = (time.monotonic() - start) / 60
            if max_minutes is not None and elapsed_min >= max_minutes:
                status["not_started"].extend(s.key for s in pending[i:])
                console.print(f"--max-minutes {max_minutes:g} reached after {elapsed_min:.1f} min: "
                              f"{len(pending) - i} run(s) not started")
                break
            cost = estimate_seconds(spec)
            if max_minutes is not None and elapsed_min * 60 + cost > max_minutes * 60:
                status["not_started"].append(spec.key)  # would overrun the budget; cheaper runs may still fit
                bar.update(task, advance=cost)
                continue
            if result_path(results_dir, spec).exists():  # finished by another worker meanwhile
                status["skipped"].append(spec.key)
                bar.update(task, advance=cost)
                continue
            lock = claim(results_dir, spec)
            if lock is None:
                status["claimed"].append(spec.key)
                bar.update(task, advance=cost)
                continue
            bar.update(task, description=spec.label())
            try:
                rec = run_one(spec, results_dir, data_dir=data_dir, threads=threads)
            except Exception as exc:  # noqa: BLE001 - keep the grid going, the run is retried next time
                status["failed"].append(spec.key)
                console.print(f"[red]FAILED[/red] {spec.key}: {type(exc).__name__}: {exc}")
            else:
                status["ran"].append(spec.key)
                console.print(f"{spec.label():38s} test {100 * rec['test_accuracy']:6.2f}%  loss {rec['final_train_loss']:.3f}  "
                              f"prune {rec['prune_seconds']:6.1f}s  train {rec['train_seconds']:6.1f}s  "
                              f"[{(time.monotonic() - start) / 60:.1f} min]")
            finally:
                release(lock)
            bar.update(task, advance=cost, done=f"{i + 1}/{len(pending)}")
    return status


def parse_list(text: str | None, kind: type) -> list[Any] | None:
    if text is None:
        return None
    return [kind(v) for v in text.replace(" ", "").split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=("mnist", "cifar", "all"), default="mnist")
    p.add_argument("--models", help="comma list: only these zoo models of the suite (e.g. lenet300)")
    p.add_argument("--methods", help="comma list (default: every registered criterion of " + ", ".join(KNOWN_METHODS) + ")")
    p.add_argument("--sparsities", help="comma list, e.g. 0.95,0.99 (default: the suite's)")
    p.add_argument("--seeds", help="comma list, e.g. 0,1,2 (default: the suite's)")
    p.add_argument("--slow-seeds", type=int, default=1, help="how many of the seeds the slow methods (SLOW_METHODS; none at present) run")
    p.add_argument("--epochs", type=int, help="override the schedule's epochs")
    p.add_argument("--schedule", choices=("short", "paper"), default="short")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--limit-train", type=int, help="train on the first N training images only (smoke runs)")
    p.add_argument("--max-minutes", type=float,
                   help="time budget: start no run after this many minutes, nor one whose estimated cost would overrun it")
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS))
    p.add_argument("--data-dir", help="folder with mnist.npz / cifar10.npz (default <repo>/../shared/data or $PAIC_DATA_DIR)")
    p.add_argument("--dry-run", action="store_true", help="list the runs: done or to do, with a time estimate")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def specs_from_args(args: argparse.Namespace) -> list[RunSpec]:
    suites = SUITES["mnist"] + SUITES["cifar"] if args.suite == "all" else SUITES[args.suite]
    models = parse_list(args.models, str)
    if models:
        unknown = set(models) - {s.model for s in suites}
        if unknown:
            raise SystemExit(f"--models: {', '.join(sorted(unknown))} not in suite {args.suite}")
        suites = [s for s in suites if s.model in models]
    have = available_methods()
    methods = parse_list(args.methods, str) or have
    missing = [m for m in methods if METHOD_VARIANTS.get(m, m).split("{")[0] not in have]  # a variant needs its criterion
    if missing:
        raise SystemExit(f"--methods: {', '.join(missing)} not registered (available: {', '.join(have)})")
    return build_grid(suites, methods, args.schedule, sparsities=parse_list(args.sparsities, float),
                      seeds=parse_list(args.seeds, int), epochs=args.epochs, limit_train=args.limit_train,
                      slow_seeds=args.slow_seeds, device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    git_info()  # the commit of the code this process runs, not HEAD when a (long) run ends
    specs = specs_from_args(args)
    results_dir = Path(args.results_dir)
    if args.dry_run:
        todo = [s for s in specs if not result_path(results_dir, s).exists()]
        for s in specs:
            state = "exists" if s not in todo else f"to run (~{estimate_seconds(s) / 60:.1f} min)"
            print(f"{s.key:60s} {state}")
        est = sum(estimate_seconds(s) for s in todo) / 60
        print(f"{len(specs)} runs: {len(specs) - len(todo)} exist, {len(todo)} to run, ~{est:.0f} min on one contended CPU core")
        return 0
    from pai_compiler.api import check_device
    from pai_compiler.errors import PaicError

    try:
        check_device(args.device)
    except PaicError as exc:
        raise SystemExit(str(exc)) from None
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    status = run_grid(specs, results_dir, data_dir=Path(args.data_dir) if args.data_dir else None,
                      threads=args.threads, max_minutes=args.max_minutes, progress=not args.no_progress)
    print(f"done in {(time.monotonic() - t0) / 60:.1f} min: ran {len(status['ran'])}, skipped {len(status['skipped'])} existing, "
          f"{len(status['claimed'])} held by another worker, {len(status['failed'])} failed, "
          f"{len(status['not_started'])} not started")
    return 1 if status["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
