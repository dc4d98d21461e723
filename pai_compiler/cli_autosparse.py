"""``paic autosparse collect`` (iterative rewind pruning labels) and ``paic autosparse train``
(the AutoSparse predictor), a typer sub-app added to the main app by :mod:`pai_compiler.cli`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pai_compiler.cli_app import guard, stdout_console

__all__ = ["autosparse_app"]

autosparse_app = typer.Typer(name="autosparse", help="AutoSparse: learn a pruning-at-init score from iterative rewind pruning.",
                             no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)



@autosparse_app.command("collect")
def autosparse_collect(
    model: Annotated[str, typer.Argument(help="zoo:NAME (e.g. zoo:lenet5) or file.py:attr (a PyTorch model).")],
    data: Annotated[str, typer.Option("--data", help="Training data: an .npz with x_train/y_train/x_test/y_test (e.g. ../shared/data/mnist.npz).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Labels file to write (.npz); rewritten after every round.")],
    rounds: Annotated[int, typer.Option("--rounds", help="Pruning rounds R.")] = 10,
    rate: Annotated[float, typer.Option("--rate", help="Fraction P of the surviving weights pruned per round.")] = 0.2,
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs per round.")] = 1,
    prune_by: Annotated[str, typer.Option("--prune-by", help="Round score: magnitude (|w|) or snip (|w * dL/dw|).")] = "magnitude",
    seed: Annotated[int, typer.Option("--seed", help="Init seed (zoo models), data order and prune batch.")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="SGD learning rate (momentum 0.9).")] = 0.01,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="SGD weight decay.")] = 5e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size.")] = 128,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N training samples only.")] = None,
    limit_test: Annotated[Optional[int], typer.Option("--limit-test", help="Evaluate on the first N test samples only.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per class of the prune batch (init gradient, SNIP).")] = 10,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's choice).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run stored in the output file.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Iterative rewind pruning of MODEL: per-weight init value, init gradient and rounds survived."""
    with guard(debug):
        from pai_compiler.lab.autosparse_collect import CollectConfig, collect
        from pai_compiler.io import check_output_path

        out = check_output_path(output, [data], force=False)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        cfg = CollectConfig(model=model, data=data, rounds=rounds, rate=rate, epochs=epochs, prune_by=prune_by, seed=seed, lr=lr,
                            weight_decay=weight_decay, batch_size=batch_size, limit=limit, limit_test=limit_test, samples=samples, device=device)
        console = stdout_console()
        labels = collect(cfg, out, resume=resume, progress=not quiet, console=console)
        if not quiet:
            import numpy as np

            counts = ", ".join(f"{r}: {c:,}" for r, c in enumerate(np.bincount(labels.survived, minlength=labels.rounds_done + 1)))
            console.print(f"{labels.w0.size:,} weights in {len(labels.layers)} layers; rounds survived -> count: {counts}")
            console.print(f"wrote {out} ({labels.rounds_done} rounds, {labels.meta.get('seconds', 0):.0f} s)")


@autosparse_app.command("train")
def autosparse_train(
    labels: Annotated[list[str], typer.Argument(help="Labels files from `paic autosparse collect`.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Predictor file to write (.npz).")],
    features: Annotated[str, typer.Option("--features", help="Comma-separated features (w, g, wg, abs_w, abs_g, abs_wg, log_fan_in, log_fan_out, log_numel, is_conv).")] = "w,g,wg,abs_w,abs_g,abs_wg,log_numel",
    standardize: Annotated[str, typer.Option("--standardize", help="layer (divide each signal by its layer's RMS) or none (raw values).")] = "layer",
    hidden: Annotated[str, typer.Option("--hidden", help="Hidden widths of the MLP, e.g. 32,32.")] = "32,32",
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (cosine decay).")] = 3e-3,
    max_per_layer: Annotated[int, typer.Option("--max-per-layer", help="Sample at most N weights per layer for training.")] = 50_000,
    split: Annotated[str, typer.Option("--split", help="Held-out split: layer (every 4th layer from the 2nd), file (the last file), or auto.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Fit the AutoSparse predictor on LABELS and report its error on a held-out split."""
    with guard(debug):
        from pai_compiler.lab.autosparse_collect import LabelSet
        from pai_compiler.passes.criteria.autosparse.predictor import train_predictor
        from pai_compiler.errors import UsageError
        from pai_compiler.io import check_output_path

        out = check_output_path(output, list(labels), force=False)
        try:
            widths = tuple(int(h) for h in hidden.split(",") if h.strip())
        except ValueError:
            raise UsageError(f"--hidden must be comma-separated integers such as 32,32, got {hidden!r}") from None
        sets = [LabelSet.load(path) for path in labels]
        console = stdout_console()
        predictor, doc = train_predictor(
            sets, features=[f.strip() for f in features.split(",") if f.strip()], standardize=standardize, hidden=widths, epochs=epochs,
            lr=lr, max_per_layer=max_per_layer, split=split, seed=seed, sources=[str(p) for p in labels],
            on_epoch=None if quiet else lambda e, loss: console.print(f"epoch {e:3d}/{epochs}  train MSE {loss:.5f}"),
        )
        predictor.save(out)
        if not quiet:
            held = doc["heldout"]
            console.print(f"held-out split by {doc['split']}: {', '.join(doc['heldout_groups'])} ({held['weights']:,} weights)")
            console.print(f"held-out MSE {held['mse']:.4f} (constant baseline {held['baseline_mse']:.4f}), MAE {held['mae']:.4f}, "
                          f"Spearman {held['spearman']:.3f}, top recall {held['top_recall']:.3f}; train MSE {doc['train']['mse']:.4f}")
            console.print(f"wrote {out} ({predictor.num_parameters:,} parameters, {Path(out).stat().st_size:,} bytes, {doc['seconds']:.1f} s)")
