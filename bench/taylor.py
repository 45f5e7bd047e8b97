"""Taylor pruning (Molchanov et al. 2019) on the image and speech tasks.

    python -m bench.taylor [--quick] [--task images|speech|all] [--threads 1] [--resume] [--out bench/results]

Starting from the shipped checkpoints — ResNet-8 on Fashion-MNIST (``resnet8-fashion-mnist``)
and ``ds2-mini`` on the spoken digits (``ds2-mini-digits``):

1. **Criteria vs oracle.**  Every criterion of :mod:`compressor.taylor.criteria` (Taylor FO on
   gates after and before BatchNorm, on weights as group contribution and as sum of individual
   contributions, Taylor SO, weight magnitude, BatchNorm scale, random) is averaged over the same
   training minibatches as the oracle ``mean_b ΔL_b²`` (the loss change when the unit is removed),
   model in eval mode (Taylor SO: 16 Hutchinson probes per minibatch); Spearman's rank correlation over the units (ResNet-8: all 224 prunable
   channel groups; ds2-mini: a random subset in ``--quick``, all 832 otherwise).  The paper reports
   > 0.9 for Taylor FO on ImageNet ResNets, weight magnitude lower.  Taylor SO is not available on
   the speech task: PyTorch's CTC loss has no second derivative.
2. **Prune + fine-tune curves.**  Taylor FO (gates after BN) vs weight magnitude vs random:
   every ``every`` steps the ``per_prune`` least important units are removed globally (Adam
   fine-tuning in between), until the parameter target, then fine-tuning goes on to the end;
   accuracy (CER) on a held-out subset just before every round (the previous round's model after
   ``every`` fine-tuning steps), and of the shrunk model on the whole test split at the end.
3. **Latency after export.**  The dense model and the shrunk Taylor-FO model exported with
   ``export_onnx`` (ONNX Runtime, one thread, batch 1, median) and ``export_tvm`` (host library,
   ``time_evaluator`` median), and PyTorch eager for reference.

Writes ``taylor[-quick].{json,md,png}`` to ``--out`` and prints the tables.  Each finished stage
is logged at once to ``taylor[-quick].runs.json`` (:class:`bench.runlog.RunLog`); ``--resume``
skips the logged stages of an interrupted run, without it the log is started anew.  ``--quick`` takes
about 11 minutes on one thread of the 2-core CI machine; the full run (16 oracle minibatches of
256 images, all 832 speech units over 4 minibatches, 2,000 / 800 fine-tuning steps per method)
about 2 hours (estimated from the per-step times of the quick run: ResNet-8 0.2 s per training
step, ds2-mini 1.2 s, one oracle forward 0.05 s / 0.3 s).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.machine import machine_info
from bench.runlog import RunLog
from compressor.taylor import (
    PruneTarget,
    TaylorPruner,
    criterion_scores,
    oracle_importance,
    oracle_scores,
    prune_finetune,
    rank_correlation,
)
from compressor.zoo.pretrained import RECIPES, load_pretrained

CRITERIA = {  # label -> (criterion, gate position)
    "Taylor FO, gate after BN": ("taylor_fo_gate", "after_bn"),
    "Taylor FO, gate before BN": ("taylor_fo_gate", "before_bn"),
    "Taylor FO, weights (group)": ("taylor_fo_weight", "after_bn"),
    "Taylor FO, weights (sum)": ("taylor_fo_weight_sum", "after_bn"),
    "Taylor SO, gate after BN": ("taylor_so_gate", "after_bn"),
    "weight magnitude": ("magnitude", "after_bn"),
    "BN scale |γ|": ("bn_scale", "after_bn"),
    "random": ("random", "after_bn"),
}
CURVE_METHODS = {"Taylor FO": "taylor_fo_gate", "weight magnitude": "magnitude", "random": "random"}


@dataclass(frozen=True)
class Size:
    """How much work each experiment does."""

    oracle_batches: int
    image_batch: int
    speech_oracle_units: int | None
    speech_oracle_batches: int
    image_every: int
    image_per_prune: int
    image_target: float
    image_steps: int
    image_eval_limit: int
    speech_every: int
    speech_per_prune: int
    speech_target: float
    speech_steps: int
    speech_eval_limit: int
    speech_eval_every: int
    latency_runs: int
    hessian_probes: int
    image_lr: float = 5e-4
    speech_lr: float = 2e-4


QUICK = Size(oracle_batches=4, image_batch=128, speech_oracle_units=96, speech_oracle_batches=2, image_every=30,
             image_per_prune=16, image_target=0.25, image_steps=360, image_eval_limit=2000, speech_every=15,
             speech_per_prune=64, speech_target=0.5, speech_steps=120, speech_eval_limit=200, speech_eval_every=1,
             latency_runs=50, hessian_probes=16)
FULL = Size(oracle_batches=16, image_batch=256, speech_oracle_units=None, speech_oracle_batches=4, image_every=50,
            image_per_prune=8, image_target=0.15, image_steps=2000, image_eval_limit=5000, speech_every=40,
            speech_per_prune=32, speech_target=0.3, speech_steps=800, speech_eval_limit=400, speech_eval_every=1,
            latency_runs=200, hessian_probes=16)


# ---------------------------------------------------------------------- tasks
def image_setup(size: Size):
    from compressor.tasks.images import ImageTask

    task = ImageTask("fashion-mnist", batch_size=128, eval_limit=size.image_eval_limit)
    model = load_pretrained("resnet8-fashion-mnist")
    n = size.image_batch
    batches = [(task.images["train"][i * n:(i + 1) * n], task.labels["train"][i * n:(i + 1) * n])
               for i in range(size.oracle_batches)]

    def loss(model: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    example = (task.images["test"][:2],)
    latency_input = (task.images["test"][:1],)
    return task, model, batches, loss, example, latency_input


def speech_setup(size: Size):
    task = RECIPES["ds2-mini-digits"].task()
    task.eval_limit = size.speech_eval_limit
    model = load_pretrained("ds2-mini-digits")
    stream = task.batches(torch.Generator().manual_seed(1234))
    batches = [next(stream) for _ in range(size.speech_oracle_batches)]

    def loss(model: nn.Module, batch) -> torch.Tensor:
        return task.loss(model, batch)

    example = (batches[0]["features"][:2, :, :, :100],)
    latency_input = (batches[0]["features"][:1, :, :, :100],)
    return task, model, batches, loss, example, latency_input


# ---------------------------------------------------------------------- 1. criteria vs oracle
def correlation_experiment(model: nn.Module, batches, loss, example, units: int | None, skip: set[str],
                           probes: int) -> dict:
    started = time.time()
    base = copy.deepcopy(model).eval()
    after = TaylorPruner("taylor_fo_gate", gate_position="after_bn", hessian_probes=probes)
    after.prepare(copy.deepcopy(base), example)
    all_units = [u.index for u in after.units]
    if units is not None and units < len(all_units):
        chosen = sorted(np.random.default_rng(0).choice(all_units, size=units, replace=False).tolist())
    else:
        chosen = all_units
    wanted = [label for label in CRITERIA if label not in skip]
    scores: dict[str, torch.Tensor] = {}
    names_after = [CRITERIA[label][0] for label in wanted if CRITERIA[label][1] == "after_bn"]
    by_name = criterion_scores(after, loss, batches, names_after)
    for label in wanted:
        name, position = CRITERIA[label]
        if position == "after_bn":
            scores[label] = by_name[name]
    if "Taylor FO, gate before BN" in wanted:
        before = TaylorPruner("taylor_fo_gate", gate_position="before_bn")
        before.prepare(copy.deepcopy(base), example)
        assert [u.name for u in before.units] == [u.name for u in after.units]
        scores["Taylor FO, gate before BN"] = criterion_scores(before, loss, batches, ["taylor_fo_gate"])["taylor_fo_gate"]
    criteria_seconds = time.time() - started
    deltas = oracle_importance(after, loss, batches, chosen, progress=True)
    oracle = oracle_scores(deltas)
    rows = {}
    for label, values in scores.items():
        values = values[chosen].numpy()
        finite = np.isfinite(values)
        rows[label] = {
            "spearman": rank_correlation(values[finite], oracle["squared"].numpy()[finite]),
            "spearman_signed": rank_correlation(values[finite], oracle["signed"].numpy()[finite]),
            "units": int(finite.sum()),
        }
    return {"units": len(chosen), "of_units": len(all_units), "batches": len(batches),
            "criteria_seconds": round(criteria_seconds, 1), "oracle_seconds": round(time.time() - started - criteria_seconds, 1),
            "rows": rows, "left_alone": after.left_alone}


# ---------------------------------------------------------------------- 2. curves
def evaluate_full(task, model: nn.Module) -> dict:
    """``task.evaluate(model)`` on the whole test split, whatever ``task.eval_limit`` is."""
    limit, task.eval_limit = task.eval_limit, None
    try:
        return task.evaluate(model)
    finally:
        task.eval_limit = limit


def curve_experiment(base: nn.Module, task, example, criterion: str, every: int, per_prune: int, target: float,
                     steps: int, eval_every: int, metric: str, lr: float, desc: str,
                     grad_clip: float | None = None) -> tuple[dict, nn.Module]:
    """One method's prune + fine-tune curve, and the shrunk model it ends with."""
    model = copy.deepcopy(base)
    pruner = TaylorPruner(criterion, every=every, per_prune=per_prune, target=PruneTarget("params", target))
    pruner.prepare(model, example)
    curve = prune_finetune(model, task, pruner, steps, lr=lr, grad_clip=grad_clip, eval_every=eval_every,
                           progress=True, desc=desc)
    small = pruner.shrink()
    return {"points": [dict(p) for p in curve], "final": {**evaluate_full(task, small), **pruner.remaining()},
            "rounds": len(pruner.history), "metric": metric}, small


# ---------------------------------------------------------------------- 3. latency
def latency_experiment(models: dict[str, nn.Module], inputs: tuple, runs: int) -> dict:
    import onnxruntime as ort

    from exporters.onnx import export_onnx
    from exporters.tvm import export_tvm
    from runtime_tests.tvm_check import latency_ms, load_vm

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models.items():
            model = model.eval()
            row: dict[str, float] = {"params": sum(p.numel() for p in model.parameters())}
            with torch.no_grad():
                for _ in range(5):
                    model(*inputs)
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    model(*inputs)
                    times.append(time.perf_counter() - start)
            row["torch_ms"] = statistics.median(times) * 1e3
            artifact = export_onnx(model, inputs, Path(tmp) / f"{len(results)}.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
            session = ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: inputs[0].numpy()}
            for _ in range(5):
                session.run(None, feed)
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            row["onnx_ms"] = statistics.median(times) * 1e3
            row["onnx_bytes"] = artifact.size_bytes
            try:
                library = export_tvm(model, inputs, Path(tmp) / f"{len(results)}.so")
                row["tvm_ms"] = latency_ms(load_vm(library.path), [x.numpy() for x in inputs], __import__("tvm").cpu())
                row["tvm_compile_s"] = library.compile_seconds
            except Exception as error:  # noqa: BLE001 - recorded, the rest of the benchmark goes on
                row["tvm_error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"[:200]
            results[label] = row
    return results


# ---------------------------------------------------------------------- driver
def run_task(name: str, size: Size, log: RunLog | None = None) -> dict:
    """Every experiment on one task; each correlation, curve and the full-split dense evaluation is
    a run of ``log`` (the Taylor FO curve together with the latency of its shrunk model, which is
    not kept), so a resumed benchmark skips what it has."""
    log = log or RunLog()
    if name == "images":
        task, model, batches, loss, example, latency_input = image_setup(size)
        skip: set[str] = set()
        units = None
        fit = {"every": size.image_every, "per_prune": size.image_per_prune, "target": size.image_target,
               "steps": size.image_steps, "eval_every": 1, "metric": "accuracy", "lr": size.image_lr}
    else:
        task, model, batches, loss, example, latency_input = speech_setup(size)
        skip = {"Taylor SO, gate after BN"}  # CTC loss: no second derivative in PyTorch
        units = size.speech_oracle_units
        fit = {"every": size.speech_every, "per_prune": size.speech_per_prune, "target": size.speech_target,
               "steps": size.speech_steps, "eval_every": size.speech_eval_every, "metric": "cer",
               "lr": size.speech_lr, "grad_clip": 5.0}
    dense = log.run(f"{name}/dense (evaluation subset)", lambda: task.evaluate(model))
    correlation = log.run(f"{name}/correlation", lambda: correlation_experiment(
        model, batches, loss, example, units, skip, size.hessian_probes))
    print(correlation_table(name, correlation))

    def curve(label: str) -> dict:
        result, small = curve_experiment(model, task, example, CURVE_METHODS[label], desc=label, **fit)
        if label == "Taylor FO":  # its shrunk model is timed at once: it is not kept
            result["latency"] = latency_experiment({"dense": model, "Taylor FO (shrunk)": small}, latency_input,
                                                   size.latency_runs)
        return result

    logged = {label: log.run(f"{name}/curve/{label}", lambda label=label: curve(label)) for label in CURVE_METHODS}
    latency = logged["Taylor FO"]["latency"]
    curves = {label: {k: v for k, v in c.items() if k != "latency"} for label, c in logged.items()}

    return {"checkpoint": "resnet8-fashion-mnist" if name == "images" else "ds2-mini-digits",
            "dense": log.run(f"{name}/dense (full test split)", lambda: evaluate_full(task, model)), "dense_subset": dense,
            "correlation": correlation, "curves": curves, "latency": latency,
            "latency_input": list(latency_input[0].shape),
            "seconds": round(sum(r["seconds"] for k, r in log.runs.items() if k.startswith(f"{name}/")), 1)}


def correlation_table(name: str, c: dict) -> str:
    lines = [(f"### {name}: Spearman correlation with the oracle ({c['units']} of {c['of_units']} units, "
             f"{c['batches']} minibatches)"), "", "| criterion | vs oracle ΔL² (paper) | vs signed ΔL | units |",
             "| --- | --- | --- | --- |"]
    for label, row in c["rows"].items():
        lines.append(f"| {label} | {row['spearman']:.3f} | {row['spearman_signed']:.3f} | {row['units']} |")
    return "\n".join(lines)


def to_markdown(result: dict) -> str:
    lines = [f"# Taylor pruning (Molchanov et al. 2019), {result['size']} run", "",
             (f"Regenerate with `python -m bench.taylor{' --quick' if result['size'] == 'quick' else ''}` "
             f"({result['seconds'] / 60:.0f} minutes, {result['machine']['threads']} thread(s) on "
             f"{result['machine']['cpu']}). Settings: `{json.dumps(result['settings'])}`."), ""]
    for name in ("images", "speech"):
        if name not in result:
            continue
        r = result[name]
        metric = "accuracy" if name == "images" else "cer"
        lines += [f"## {name} — `{r['checkpoint']}` (dense test {metric} {r['dense'][metric]:.2%})", "",
                  correlation_table(name, r["correlation"]), "",
                  (f"### {name}: prune + fine-tune (target "
                  f"{result['settings']['image_target' if name == 'images' else 'speech_target']:.0%} of the parameters)"), "",
                  f"| method | rounds | params left | FLOPs left | test {metric} (shrunk, full split) | last curve point |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, c in r["curves"].items():
            f = c["final"]
            last = c["points"][-1]
            lines.append(f"| {label} | {c['rounds']} | {f['params']:,} ({f['params_fraction']:.1%}) | "
                         f"{f['flops_per_example']:,.0f} ({f['flops_fraction']:.1%}) | {f[metric]:.2%} | "
                         f"{last[metric]:.2%} at step {last['step']} |")
        lines += ["", f"Curve points (fraction of parameters → {metric} on the evaluation subset):", ""]
        for label, c in r["curves"].items():
            pts = ", ".join(f"{p['params_fraction']:.2f}→{p[metric]:.3f}" for p in c["points"])
            lines.append(f"- {label}: {pts}")
        lines += ["", f"### {name}: latency after export (batch {r['latency_input']}, one thread, median)", "",
                  "| model | parameters | PyTorch ms | ONNX Runtime ms | TVM ms |", "| --- | --- | --- | --- | --- |"]
        for label, row in r["latency"].items():
            tvm_ms = f"{row['tvm_ms']:.3f}" if "tvm_ms" in row else row.get("tvm_error", "–")
            lines.append(f"| {label} | {row['params']:,} | {row['torch_ms']:.3f} | {row['onnx_ms']:.3f} | {tvm_ms} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("images", "speech") if n in result]
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.8 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        r = result[name]
        metric = "accuracy" if name == "images" else "cer"
        for col, axis in enumerate(("params_fraction", "flops_fraction")):
            ax = axes[row][col]
            for label, c in r["curves"].items():
                ax.plot([p[axis] for p in c["points"]], [100 * p[metric] for p in c["points"]], marker=".", label=label)
            ax.axhline(100 * r["dense_subset"][metric], color="black", linestyle="--", linewidth=0.8, label="dense")
            ax.invert_xaxis()
            ax.set_xlabel("remaining " + ("parameters" if col == 0 else "FLOPs") + " (fraction)")
            ax.set_ylabel(f"{metric} (%)")
            ax.set_title(f"{r['checkpoint']}: {metric} vs {'parameters' if col == 0 else 'FLOPs'}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer minibatches, units and steps (about 11 minutes)")
    parser.add_argument("--task", choices=["images", "speech", "all"], default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs logged by an earlier, interrupted run with the same options")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    stem = "taylor" + ("-quick" if args.quick else "") + ("" if args.task == "all" else f"-{args.task}")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{stem}.runs.json"
    if not args.resume:
        log_path.unlink(missing_ok=True)
    log = RunLog(log_path)
    result: dict = {"size": "quick" if args.quick else "full", "machine": machine_info(args.threads),
                    "settings": asdict(size)}
    for name in (["images", "speech"] if args.task == "all" else [args.task]):
        result[name] = run_task(name, size, log)
    result["seconds"] = round(sum(result[name]["seconds"] for name in ("images", "speech") if name in result), 1)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
