"""Prune a zoo model at initialisation with paic, then train it on MNIST or CIFAR-10.

    python examples/train.py --dataset mnist --model lenet300 --sparsity 0.9 --epochs 10
    python examples/train.py --dataset cifar10 --model resnet20 --sparsity 0.95 --method dpai --device cuda
    python examples/train.py --dataset mnist --epochs 1 --limit-train 10000 --limit-test 2000   # smoke run

Data: ``<repo>/../shared/data/{mnist,cifar10}.npz`` (``--data-dir`` or ``$PAIC_DATA_DIR``).
The loop (SGD momentum 0.9, weight decay 1e-4, step decay x0.1 at 50%/75% of the epochs,
batch 128, random crop + flip for CIFAR) lives in ``pai_compiler.lab.training``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pai_compiler.lab import zoo
from pai_compiler.errors import PaicError
from pai_compiler.prune import default_method, prune
from pai_compiler.lab.training import load_dataset, train

DEFAULT_MODEL = {"mnist": "lenet300", "cifar10": "resnet20"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    p.add_argument("--model", choices=sorted(zoo.MODELS), help="zoo model (default: lenet300 for mnist, resnet20 for cifar10)")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of prunable weights removed")
    p.add_argument("--method", help=f"pruning criterion (default {default_method()})")
    p.add_argument("--allocation", default="erk", choices=("erk", "uniform", "global"))
    p.add_argument("--pipeline", help="full paic pipeline, e.g. 'erk{sparsity=0.9},dpai{steps=300}'")
    p.add_argument("--steps", type=int, help="dpai optimisation steps")
    p.add_argument("--dense", action="store_true", help="train without pruning (baseline)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--limit-train", type=int, help="use only the first N training images (smoke runs)")
    p.add_argument("--limit-test", type=int, help="use only the first N test images")
    p.add_argument("--data-dir", help="folder with mnist.npz / cifar10.npz (default <repo>/../shared/data or $PAIC_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the training history here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or DEFAULT_MODEL[args.dataset]
    try:
        data = load_dataset(args.dataset, args.data_dir, limit_train=args.limit_train, limit_test=args.limit_test)
        torch.manual_seed(args.seed)
        model = zoo.build(name, num_classes=10)
        summary: dict[str, object] = {"model": name, "dataset": args.dataset}
        if not args.dense:
            example = torch.randn(2, *data.input_shape)
            result = prune(model, example, sparsity=None if args.pipeline else args.sparsity, method=args.method,
                           allocation=args.allocation, pipeline=args.pipeline, steps=args.steps, seed=args.seed, device=args.device)
            result.apply(model)
            summary.update(pipeline=result.pipeline, density=result.density, audit=result.report.get("totals"))
            print(f"pruned {name} with {result.pipeline}: density {100 * result.density:.2f}%")
        out = train(model, None, data, args.epochs, args.lr, batch_size=args.batch_size, device=args.device,
                    seed=args.seed, progress=not args.no_progress)
    except PaicError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary.update(out)
    print(f"final test accuracy {100 * out['test_accuracy']:.2f}% (best {100 * out['best_test_accuracy']:.2f}%), "
          f"pruned weights nonzero: {out['masked_nonzero']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
