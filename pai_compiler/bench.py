"""``paic bench``: median latency of ONNX / torch models on one input, speed-up = t(first) / t(model).

Every model gets the same random input (from ``--input-shape``, else the first model's input
shapes with the batch dim bound by ``--batch``): N(0, 1) floats, and for an integer input what
``--data random`` feeds (``backends.index_inputs.role_array`` by the first model's input roles): indices uniform
below the smallest embedding table it picks rows of, all ones for a mask (an all-zero mask would
compare fully masked models). ``.onnx`` files run in onnxruntime with
``threads`` intra-op threads, ``.pt`` files (a whole pickled module, e.g. ``paic compact -o
FAST.pt``) in torch with ``torch.set_num_threads(threads)``. After ``warmup`` runs of each,
the models run ``repeats`` rounds in alternating order and each gets its median wall time.
Outputs are compared with the first model's: ``max_abs`` = max|y - y0|, ``max_rel`` =
max_abs / max|y0|; a model *agrees* when every output has y0's shape and ``max_rel <= 1e-4``.
"""
from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pai_compiler.backends.sparse_timing import RoundHook, time_alternating
from pai_compiler.progress import MetricUpdate, metric_bar
from pai_compiler.errors import ModelError, PaicError, UsageError

if TYPE_CHECKING:
    from pai_compiler.backends.index_inputs import InputRole

__all__ = ["BenchRow", "BenchResult", "InputSpec", "bench_models", "parse_shape", "render_bench", "render_sparse_exec", "AGREE_REL"]

#: largest max_rel for which two models' outputs agree
AGREE_REL = 1e-4
Runner = Callable[[list[np.ndarray]], list[np.ndarray]]
GraphSource = Callable[[], Any]  # the model's IR graph, built on demand (only integer inputs need it)


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (ints, or str for a symbolic dim) and numpy dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class _Loaded:
    """One loaded model: how to run it, its runtime, its input specs (None: unknown) and its IR graph on demand."""

    run: Runner
    runtime: str
    specs: list[InputSpec] | None
    graph: GraphSource


@dataclass(frozen=True)
class BenchRow:
    """One model's latency, speed-up against the first model and output agreement with it."""

    model: str
    runtime: str
    median_ms: float
    speedup: float
    max_abs: float | None  # None: the outputs' shapes differ from the first model's
    max_rel: float | None
    agrees: bool


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> (1, 3, 32, 32); a usage error names ``--input-shape`` otherwise."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be comma-separated positive integers, e.g. 1,3,32,32; got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"--input-shape must be comma-separated positive integers, e.g. 1,3,32,32; got {text!r}")
    return dims


def _onnx_runner(path: Path, threads: int) -> tuple[Runner, list[InputSpec]]:
    from pai_compiler.ort import session

    try:
        sess = session(path, device="cpu", threads=threads)
    except Exception as exc:  # onnxruntime raises its own types for a broken file
        raise ModelError(f"{path}: onnxruntime cannot load it: {' '.join(str(exc).split())[:200]}") from None
    kinds = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
    specs = [InputSpec(i.name, tuple(d if isinstance(d, int) else str(d) for d in i.shape), kinds.get(i.type, "float32"))
             for i in sess.get_inputs()]
    names = [s.name for s in specs]
    return lambda feed: list(sess.run(None, dict(zip(names, feed)))), specs


def _torch_runner(path: Path) -> tuple[Runner, list[InputSpec] | None, Any]:
    import torch  # heavy optional dependency, only for .pt models

    try:
        module = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # a corrupt or foreign pickle: many exception types
        raise ModelError(f"{path}: torch.load cannot read it: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"{path}: holds a {type(module).__name__}, not a torch module (paic bench runs whole pickled "
                         "modules, e.g. `paic compact MODEL -o FAST.pt`)")
    module.eval()
    graph = getattr(module, "graph", None)
    specs = None
    if graph is not None and hasattr(graph, "inputs"):
        specs = [InputSpec(v.name, tuple(d if isinstance(d, int) else str(d) for d in (v.shape or ())), v.dtype)
                 for v in graph.inputs]

    def run(feed: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*[torch.from_numpy(x) for x in feed])
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [t.detach().cpu().numpy() for t in outs]

    return run, specs, graph


def _load(path: str, threads: int) -> _Loaded:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"MODEL {path}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".onnx":
        run, specs = _onnx_runner(file, threads)
        return _Loaded(run, "onnxruntime", specs, lambda: _onnx_graph(file))
    if suffix in (".pt", ".pth"):
        run, torch_specs, graph = _torch_runner(file)
        return _Loaded(run, "torch", torch_specs, lambda: graph)
    raise UsageError(f"MODEL {path}: unknown format {suffix or '(none)'!r}; paic bench runs .onnx and .pt files")


def _onnx_graph(file: Path) -> Any:
    from pai_compiler.api import load_model  # the IR of the model: only a model with integer inputs needs it (their roles)

    return load_model(file)


def _integer_roles(model: _Loaded) -> dict[str, InputRole]:
    """The roles of the model's inputs by name when it has an integer input (else none needed, {})."""
    if not model.specs or all(np.dtype(spec.dtype).kind == "f" for spec in model.specs):
        return {}
    from pai_compiler.backends.index_inputs import input_roles  # imports the IR; only integer inputs need it

    try:
        graph = model.graph()
    except PaicError:  # runs in onnxruntime but not in paic's IR: all ones (a valid index, an open mask)
        return {}
    return {} if graph is None else {role.name: role for role in input_roles(graph)}


def _feed(specs: list[InputSpec] | None, first: str, batch: int, shape: tuple[int, ...] | None, seed: int,
          roles: Mapping[str, InputRole]) -> list[np.ndarray]:
    """The input for every model: ``shape`` for the first input, else the specs with a symbolic batch dim = ``batch``;
    floats N(0, 1), integers by ``roles`` (see the module docstring), all ones without a role."""
    if specs is None and shape is None:
        raise ModelError(f"{first}: input shape unknown (a plain torch module); pass --input-shape, e.g. 1,3,32,32")
    specs = specs or [InputSpec("input", shape or (), "float32")]
    batch = shape[0] if shape is not None else batch
    # the first input's symbolic dims, bound by --input-shape, bind the same names elsewhere (an attention mask's seq)
    bound = {str(d): int(v) for d, v in zip(specs[0].shape, shape or ()) if not isinstance(d, int)}
    rng = np.random.default_rng(seed)
    feed: list[np.ndarray] = []
    for index, spec in enumerate(specs):
        dims: list[int | str] = (list(shape) if index == 0 and shape is not None
                                 else [d if isinstance(d, int) else bound.get(str(d), d) for d in spec.shape])
        if dims and not isinstance(dims[0], int):
            dims[0] = batch
        unknown = [str(d) for d in dims if not isinstance(d, int)]
        if unknown:
            raise ModelError(f"{first}: input {spec.name!r} has symbolic dim(s) {', '.join(unknown)}; pass --input-shape "
                             "(the full shape of the first input, batch first)")
        kind = np.dtype(spec.dtype) if spec.dtype in ("float32", "float64", "int64", "int32", "bool") else np.dtype("float32")
        role = roles.get(spec.name)
        if kind.kind == "f":
            feed.append(rng.standard_normal(dims).astype(kind))
        elif role is not None and role.kind != "float":
            from pai_compiler.backends.index_inputs import role_array  # imports the IR; only integer inputs need it

            feed.append(role_array(role, [int(d) for d in dims], rng).astype(kind))
        else:
            feed.append(np.ones(dims, dtype=kind))
    return feed


def _agreement(got: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float | None, float | None, bool]:
    if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
        return None, None, False
    max_abs = max((float(np.abs(g.astype(np.float64) - r).max()) if r.size else 0.0 for g, r in zip(got, ref)), default=0.0)
    scale = max((float(np.abs(r).max()) for r in ref if r.size), default=0.0)
    max_rel = max_abs / scale if scale > 0 else max_abs
    return max_abs, max_rel, max_rel <= AGREE_REL


@dataclass(frozen=True)
class BenchResult:
    """Every model's row and the conditions they ran under."""

    rows: tuple[BenchRow, ...]
    batch: int
    threads: int
    repeats: int
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {"batch": self.batch, "threads": self.threads, "repeats": self.repeats, "warmup": self.warmup,
                "agree_rel": AGREE_REL, "models": [asdict(row) for row in self.rows]}


def _outputs(models: Sequence[str], runners: list[Runner], feed: list[np.ndarray]) -> list[list[np.ndarray]]:
    outputs = []
    for path, run in zip(models, runners):
        try:
            outputs.append(run(feed))
        except Exception as exc:  # the runtimes raise many types for a mismatched input
            raise ModelError(f"{path}: cannot run on input shape(s) {[list(x.shape) for x in feed]}: "
                             f"{' '.join(str(exc).split())[:160]}") from None
    return outputs


def bench_models(models: Sequence[str], *, batch: int | None = None, threads: int = 1, input_shape: str | None = None,
                 repeats: int = 10, warmup: int = 3, seed: int = 0, progress: bool = False, label: str = "bench") -> BenchResult:
    """Time every model on the same input, alternating; rows in the order given. ``progress``: a bar
    ``label`` over the rounds with each model's running median (stderr, terminals only, redrawn between rounds)."""
    if not models:
        raise UsageError("give at least one MODEL (.onnx or .pt)")
    for flag, value, low in (("--threads", threads, 1), ("--batch", batch, 1), ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be an integer >= {low}, got {value}")
    shape = parse_shape(input_shape) if input_shape else None
    if shape is not None and batch is not None and shape[0] != batch:
        raise UsageError(f"--batch {batch} contradicts --input-shape {input_shape} (batch first); give one of them")
    import torch  # heavy optional dependency: the thread count of the torch models

    loaded = [_load(path, threads) for path in models]
    runners = [entry.run for entry in loaded]
    feed = _feed(loaded[0].specs, models[0], batch or 1, shape, seed, _integer_roles(loaded[0]))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outputs = _outputs(models, runners, feed)
        keys = [str(index) for index in range(len(models))]
        with metric_bar(progress, f"[bold]{label}[/]", repeats, unit="rounds", timed=True) as bar:
            times = time_alternating({key: (lambda run=run: run(feed)) for key, run in zip(keys, runners)},
                                     repeats=repeats, warmup=warmup, on_round=_round_metrics(bar, models))
    finally:
        torch.set_num_threads(previous)
    rows = []
    for key, path, model, out in zip(keys, models, loaded, outputs):
        max_abs, max_rel, agrees = _agreement(out, outputs[0])
        rows.append(BenchRow(model=os.fspath(path), runtime=model.runtime, median_ms=round(times[key], 4),
                             speedup=round(times["0"] / times[key], 4) if times[key] > 0 else float("inf"),
                             max_abs=max_abs, max_rel=max_rel, agrees=agrees))
    batch_run = int(feed[0].shape[0]) if feed and feed[0].ndim else 1
    return BenchResult(rows=tuple(rows), batch=batch_run, threads=threads, repeats=repeats, warmup=warmup)


def _round_metrics(bar: MetricUpdate | None, models: Sequence[str]) -> RoundHook | None:
    """The timing's round hook for ``bar``: each model's running median, by file name (None without a bar)."""
    if bar is None:
        return None
    names = [Path(m).name for m in models]

    def on_round(done: int, samples: Mapping[str, list[float]]) -> None:
        medians = (statistics.median(values) * 1e3 for values in samples.values())
        bar(done, " · ".join(f"{name} {ms:.3f} ms" for name, ms in zip(names, medians)))

    return on_round


def _error(value: float | None) -> str:
    return "shape differs" if value is None else f"{value:.2e}"


def render_bench(console: Any, doc: dict[str, Any]) -> None:
    """A rich table of ``BenchResult.to_dict()``."""
    from rich.table import Table

    table = Table(title=f"paic bench — batch {doc['batch']}, {doc['threads']} thread(s), median of {doc['repeats']} "
                        f"after {doc['warmup']} warm-up", title_justify="left")
    for column in ("model", "runtime", "median ms", "speed-up", "max abs err", "max rel err", "agrees"):
        table.add_column(column, justify="left" if column in ("model", "runtime") else "right")
    for row in doc["models"]:
        table.add_row(row["model"], row["runtime"], f"{row['median_ms']:.3f}", f"{row['speedup']:.2f}×",
                      _error(row["max_abs"]), _error(row["max_rel"]), "yes" if row["agrees"] else "[red]no[/]")
    console.print(table)



def render_sparse_exec(console: Any, doc: dict[str, Any]) -> None:
    """The per-layer kernel choice of a sparse-execution ``.pt`` (the report's ``sparse_exec`` block)."""
    from rich.table import Table

    table = Table(title=f"sparse execution — {doc['device']}, batch {doc['batch']}, {doc['threads']} thread(s), "
                        f"median of {doc['repeats']} alternating", title_justify="left")
    for column in ("layer", "weight", "density", "taps used", "dense ms", "sparse ms", "choice"):
        table.add_column(column, justify="left" if column in ("layer", "weight", "choice") else "right")
    for row in doc["layers"]:
        sparse = ", ".join(f"{k} {v:.3f}" for k, v in row["sparse_ms"].items()) or "-"
        table.add_row(row["node"], "×".join(str(d) for d in row["weight_shape"]), f"{row['density']:.2%}",
                      f"{row['columns_used']}/{row['columns']}", f"{row['dense_ms']:.3f}", sparse, row["choice"])
    console.print(table)
    note = f" ({doc['fallback']})" if doc["fallback"] else ""
    console.print(f"model: dense {doc['model_dense_ms']:.3f} ms → chosen {doc['model_chosen_ms']:.3f} ms "
                  f"({doc['speedup']:.2f}×), {doc['sparse_layers']} sparse layer(s){note}")
    times = doc.get("forward_ms") or {}
    if doc.get("forward") == "traced":
        traced_ms = min(ms for name, ms in times.items() if name != "plan")  # the traced choice, or the traced dense model
        console.print(f"forward: TorchScript trace of the plan at the timed input shape (others run the plan), "
                      f"{traced_ms:.3f} ms against {times['plan']:.3f} ms for the plan")
    elif doc.get("forward_note"):
        console.print(f"forward: plan ({doc['forward_note']})")
    if doc.get("advice"):
        console.print(f"[yellow]note:[/] {doc['advice']}", soft_wrap=True)  # one line, whatever the terminal width
    elif doc.get("onnxruntime_ms") is not None:
        console.print(f"compact ONNX in onnxruntime: {doc['onnxruntime_ms']:.3f} ms (not faster than this module)")
    elif doc.get("onnxruntime_note"):
        console.print(doc["onnxruntime_note"])
