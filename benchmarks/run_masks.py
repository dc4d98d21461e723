"""Rebuild the mask an accuracy run trained, from its seed, and check it: digest = sha256 of (name, shape, packed bits) per mask.

A run file of ``benchmarks/accuracy.py`` records method, sparsity, seed, pipeline, commit and
density, not the mask. The mask is rebuilt twice: with the current code (:func:`rebuild`, the
recipe ``accuracy.prune_for_run``) and with the code of the run's own commit
(:func:`digests_at_commit`: ``git archive`` of that commit, then that tree's own
``benchmarks/accuracy.py`` ``run_one`` in a subprocess, its training call intercepted, so the
recipe is exactly the one that ran). Where a method's current default no longer builds the old
masks, the current rebuild sets the option that does (:data:`REPRODUCING_OPTIONS`, e.g.
``dpai{state=weights}``). :func:`check_run` calls a run *reproduced* when the two
digests are equal and the rebuilt density equals the recorded one. A GPU run pruned on
``cuda`` computed its criterion's scores there; a CPU rebuild stands for it only for the
criteria that never read the device (:data:`DEVICE_FREE`), the others need a rebuild on a GPU.

    python benchmarks/run_masks.py --tree /tmp/paic_trees/3fa760c --cases '[["dpai", 0.9, 0]]'   # JSON lines
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEVICE_FREE", "REPRODUCING_OPTIONS", "reproducing_pipeline", "RunRecord", "MaskCase", "RebuiltMask", "MaskCheck", "mask_digest", "load_runs", "rebuild",
           "digests_at_commit", "check_run", "load_accuracy", "attached_masks"]

ROOT = Path(__file__).resolve().parents[1]
#: options that rebuild the recorded runs' masks where the method's current default no longer does: DPaI's
#: default ``state`` became ``auto`` (channel mode: one Adam per kernel, rounded once, not per weight every
#: step), which moves a few weights; ``state=weights`` is the per-weight state the runs had (the check
#: below still compares every rebuilt mask with the run's own commit, bit for bit)
REPRODUCING_OPTIONS: dict[str, dict[str, Any]] = {"dpai": {"state": "weights"}}
#: criteria whose masks do not depend on the pruning device: random scores from numpy, |w| of the
#: CPU-initialised weights; the ERK allocation is device-free as well
DEVICE_FREE = frozenset({"random-erk", "random", "magnitude"})


@dataclass(frozen=True)
class RunRecord:
    """What a run file says about the trained mask, and the accuracy it reached."""

    file: str
    dataset: str
    model: str
    method: str
    sparsity: float
    seed: int
    device: str
    commit: str
    pipeline: str
    density: float | None  # None: the run file predates the field (then only the digests are compared)
    test_accuracy: float

    @property
    def device_kind(self) -> str:
        return self.device.split(":")[0]

    def rebuildable(self, mask_device: str = "cpu") -> bool:
        """Can a rebuild on ``mask_device`` be this run's mask? Not a CPU rebuild of device-dependent scores computed on a GPU."""
        return self.device_kind == "cpu" or self.method in DEVICE_FREE or mask_device.split(":")[0] == self.device_kind

    def case(self, mask_device: str = "cpu") -> MaskCase:
        """The mask to rebuild for this run; on ``mask_device`` unless its criterion is device-free."""
        device = "cpu" if self.method in DEVICE_FREE else mask_device
        return MaskCase(self.dataset, self.model, self.method, self.sparsity, self.seed, device)


@dataclass(frozen=True)
class MaskCase:
    """One mask: (dataset, model, method, sparsity, seed) pruned on ``device``."""

    dataset: str
    model: str
    method: str
    sparsity: float
    seed: int
    device: str = "cpu"

    @property
    def key(self) -> str:
        return f"{self.dataset}_{self.model}_{self.method}_sp{self.sparsity:g}_seed{self.seed}_{self.device}"


@dataclass(frozen=True)
class RebuiltMask:
    """A mask rebuilt with the current code: its digest, density, pipeline and (name -> bool array) masks."""

    case: MaskCase
    digest: str
    density: float
    pipeline: str
    masks: dict[str, np.ndarray]

    def summary(self) -> dict[str, Any]:
        """What the results file keeps of it (and :func:`check_run` reads)."""
        return {"digest": self.digest, "density": self.density, "device": self.case.device, "pipeline": self.pipeline}


@dataclass(frozen=True)
class MaskCheck:
    """``status``: reproduced, differs, needs GPU or unverified; ``note`` says why."""

    status: str
    note: str

    @property
    def reproduced(self) -> bool:
        return self.status == "reproduced"


def mask_digest(masks: Mapping[str, Any]) -> str:
    """sha256 over (name, shape, packed bits) of every mask, by name; 16 hex digits."""
    sha = hashlib.sha256()
    for name in sorted(masks):
        bits = np.asarray(masks[name]).astype(bool)
        sha.update(name.encode())
        sha.update(str(tuple(bits.shape)).encode())
        sha.update(np.packbits(bits.reshape(-1)).tobytes())
    return sha.hexdigest()[:16]


def load_runs(runs_dir: Path, *, dataset: str, model: str) -> list[RunRecord]:
    """The runs of (dataset, model) on the full training set, by file name."""
    runs = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        rec = json.loads(path.read_text())
        if (rec.get("dataset"), rec.get("model")) != (dataset, model) or rec.get("limit_train") or rec.get("test_accuracy") is None:
            continue
        runs.append(RunRecord(path.name, rec["dataset"], rec["model"], rec["method"], float(rec["sparsity"]), int(rec["seed"]),
                              str(rec.get("device") or "cpu"), str(rec.get("commit") or ""), str(rec.get("pipeline") or ""),
                              None if rec.get("density") is None else float(rec["density"]), float(rec["test_accuracy"])))
    return runs


def load_accuracy(tree: Path = ROOT, name: str = "paic_bench_accuracy") -> Any:
    """``benchmarks/accuracy.py`` of ``tree`` as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(tree) / "benchmarks" / "accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _spec(acc: Any, case: MaskCase) -> Any:
    suite = next(s for group in acc.SUITES.values() for s in group if (s.dataset, s.model) == (case.dataset, case.model))
    schedule = acc.make_schedule("short", suite)
    if "device" in {f.name for f in dataclasses.fields(acc.RunSpec)}:  # else (older trees) run_one takes it
        return acc.RunSpec(case.dataset, case.model, case.method, case.sparsity, case.seed, schedule, device=case.device)
    return acc.RunSpec(case.dataset, case.model, case.method, case.sparsity, case.seed, schedule)


def reproducing_pipeline(case: MaskCase) -> str | None:
    """The run's pipeline (ERK + the method) with :data:`REPRODUCING_OPTIONS` set on the method's pass, or None."""
    # not at the top: this module also runs on older trees (its _digest_tree), where these may differ
    from pai_compiler.api import build_passes
    from pai_compiler.pipeline import format_pipeline

    options = REPRODUCING_OPTIONS.get(case.method)
    if not options:
        return None
    passes = build_passes(method=case.method, sparsity=case.sparsity, allocation="erk")
    return format_pipeline([dataclasses.replace(p, **options) if p.name == case.method else p for p in passes])


def rebuild(case: MaskCase, data_dir: Path) -> RebuiltMask:
    """The case's mask from the current code: ``accuracy.prune_for_run``, with :func:`reproducing_pipeline` if any."""
    from pai_compiler.lab import zoo  # not at the top: this module also runs on older trees (no pai_compiler.lab)

    acc = load_accuracy()
    model, pruned, _ = acc.prune_for_run(_spec(acc, case), tuple(zoo.input_shape(case.model)), data_dir,
                                         pipeline=reproducing_pipeline(case))
    masks = attached_masks(pruned.apply(model))
    return RebuiltMask(case, mask_digest(masks), pruned.density, pruned.pipeline, masks)


def attached_masks(model: Any) -> dict[str, np.ndarray]:
    """weight name -> mask of every ``torch.nn.utils.prune`` mask on ``model`` (what training saw)."""
    return {name[: -len("_mask")]: buf.detach().cpu().numpy().astype(bool)
            for name, buf in model.named_buffers() if name.endswith("_mask")}


def digests_at_commit(commit: str, cases: Sequence[MaskCase], data_dir: Path, *, trees: Path | None = None,
                      timeout_s: float = 3600) -> dict[str, dict[str, Any]]:
    """case key -> {digest, density} from the code of ``commit`` (its own accuracy.py, in a subprocess)."""
    if not cases:
        return {}
    trees = Path(trees or Path(tempfile.gettempdir()) / "paic_trees")
    tree = trees / commit
    if not tree.is_dir():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, timeout=300)
        if archive.returncode != 0:
            raise RuntimeError(f"commit {commit}: git archive failed: {archive.stderr.decode()[:200].strip()}")
        trees.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=trees) as partial:  # a tree appears whole or not at all
            subprocess.run(["tar", "-x", "-C", partial], input=archive.stdout, check=True, timeout=300)
            os.replace(partial, tree)
            os.mkdir(partial)  # for the context manager's cleanup
    payload = json.dumps([[c.dataset, c.model, c.method, c.sparsity, c.seed, c.device] for c in cases])
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--tree", str(tree), "--cases", payload, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"commit {commit}: rebuilding its masks failed: {done.stderr.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["key"]: {"digest": row["digest"], "density": row["density"]} for row in rows}


def check_run(run: RunRecord, rebuilt: Mapping[str, Any] | None, at_commit: Mapping[str, Any] | None) -> MaskCheck:
    """Is the rebuilt mask (``RebuiltMask.summary()``) the one ``run`` trained? ``at_commit``: the same case rebuilt
    with the code of the run's commit, or None."""
    if not run.rebuildable(rebuilt["device"] if rebuilt else "cpu"):
        return MaskCheck("needs GPU", f"pruned on {run.device}: {run.method} scores on the device, a CPU rebuild may differ "
                                      "(rebuild with --mask-device cuda on a GPU)")
    if rebuilt is None:
        return MaskCheck("unverified", "not rebuilt")
    if run.density is not None and rebuilt["density"] != run.density:  # kept / total: equal masks, the same float
        return MaskCheck("differs", f"density {rebuilt['density']!r} != recorded {run.density!r}")
    if at_commit is None:
        return MaskCheck("unverified", f"not rebuilt at the run's commit {run.commit[:8]}")
    if at_commit["digest"] != rebuilt["digest"]:
        return MaskCheck("differs", f"the code since {run.commit[:8]} changed the mask ({at_commit['digest']} there, "
                                    f"{rebuilt['digest']} now)")
    return MaskCheck("reproduced", f"digest {rebuilt['digest']} = at {run.commit[:8]}")


class _TrainingReached(Exception):
    """Raised by the stand-in training call: the masks are attached, the rest of the run is not needed."""

    def __init__(self, masks: dict[str, np.ndarray]) -> None:
        super().__init__("training reached")
        self.masks = masks


def _intercept_training() -> None:
    """Replace the tree's training function (where it lives at that commit) by one that raises with the masks."""
    def stop(model: Any, *args: Any, **kwargs: Any) -> None:
        raise _TrainingReached(attached_masks(model))

    for where in ("pai_compiler.lab.training", "pai_compiler.training"):
        try:
            importlib.import_module(where).train = stop  # type: ignore[attr-defined]
        except ImportError:
            continue


def _digest_tree(tree: Path, cases: list[list[Any]], data_dir: Path) -> None:
    """Print one JSON line per case: its mask from ``tree``'s own ``accuracy.run_one`` (run in this process)."""
    acc = load_accuracy(tree, "paic_bench_accuracy_at_commit")
    _intercept_training()
    with tempfile.TemporaryDirectory() as results:
        for dataset, model, method, sparsity, seed, device in cases:
            case = MaskCase(dataset, model, method, float(sparsity), int(seed), device)
            device = {"device": case.device} if "device" in inspect.signature(acc.run_one).parameters else {}
            try:
                acc.run_one(_spec(acc, case), Path(results), data_dir=data_dir, **device)
            except _TrainingReached as reached:
                kept = sum(int(m.sum()) for m in reached.masks.values())
                total = sum(m.size for m in reached.masks.values())
                print(json.dumps({"key": case.key, "digest": mask_digest(reached.masks), "density": kept / total}), flush=True)
            else:
                raise SystemExit(f"{case.key}: {tree}'s run_one finished without reaching its training call")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True, help="a source tree (e.g. git archive of a run's commit); PYTHONPATH must name it")
    parser.add_argument("--cases", required=True, help='JSON list of [dataset, model, method, sparsity, seed, device]')
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args(argv)
    _digest_tree(Path(args.tree), json.loads(args.cases), Path(args.data_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
