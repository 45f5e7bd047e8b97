"""The accuracy experiments of Narang et al. (2017) on the offline speech tasks.

    python -m bench.accuracy [--quick] [--task digits|sentences] [--threads N] [--jobs N] [--resume] [--out DIR]

Three experiments, each starting from the same trained dense model (the shipped
``ds2-mini-digits`` or ``ds2-mini-sentences`` checkpoint) and fine-tuned for
the same number of steps with several seeds (mean and spread reported):

1. **gradual vs hard**: at 80 / 90 / 95 % sparsity of the recurrent and fully connected weights,
   gradual pruning with the threshold schedule of Narang et al. (``ThresholdSchedule``, q chosen
   for the target; the sparsity it reaches is reported, it can fall short because weights move),
   gradual pruning with the cubic schedule (reaches the target exactly) and one-shot "hard"
   pruning at the first step.  The paper: gradual 7–9 % better than hard.
2. **large sparse vs small dense**: the model pruned gradually to 90 % against a dense model
   whose hidden size gives about the same number of non-zero recurrent weights, trained from
   scratch for as many steps as dense training plus fine-tuning.  The paper: the large sparse
   model wins.
3. **block vs unstructured**: 4×4 and 16×1 blocks (max-magnitude block score) against element
   pruning at 90 %, cubic schedule.

Writes ``accuracy-<task>.json``, ``.md`` and ``.png``.  Every finished fine-tuning or training run
is also written at once to ``accuracy-<task>.runs.json`` beside them (:class:`bench.runlog.RunLog`): an
interrupted benchmark started again with the same options and ``--resume`` skips the runs it
already has, so the full size (hours on two cores) can be run in several sittings; without
``--resume`` the log is started anew and every run is measured again.  ``--jobs N`` runs N worker
processes side by side on that log (each run claimed by one worker), then writes the report.
``seconds`` in the result is the sum of the runs' own wall-clock times, wherever they ran, and
``cpu_seconds`` the sum of their CPU times (pauses and a shared machine do not inflate it; runs
logged before it was recorded are counted by their wall clock).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.machine import machine_info
from bench.runlog import RunLog
from compressor import BlockShape, CubicSchedule, MagnitudePruner, OneShot, PruneGroup, ThresholdSchedule
from compressor.tasks.speech import STANDARD_CORPORA, SpeechCorpusSpec, SpeechTask
from compressor.training import TrainConfig, train
from compressor.zoo import RECURRENT_WEIGHTS, build_model
from compressor.zoo.pretrained import RECIPES, load_pretrained


@dataclass(frozen=True)
class Size:
    """How much work one experiment does."""

    corpus: SpeechCorpusSpec
    finetune_steps: int
    seeds: tuple[int, ...]
    sparsities: tuple[float, ...]
    eval_limit: int | None


QUICK = Size(STANDARD_CORPORA["digits"], 150, (0, 1), (0.9, 0.95), 200)
FULL = Size(STANDARD_CORPORA["digits"], 600, (0, 1, 2), (0.8, 0.9, 0.95), None)


def sized(size: Size, task: str) -> Size:
    """``size`` on the corpus of ``task`` (digits or sentences)."""
    return Size(STANDARD_CORPORA[task], size.finetune_steps, size.seeds, size.sparsities, size.eval_limit)


def pruning_groups(schedule, final_sparsity: float | None = None, block: BlockShape = BlockShape()) -> list[PruneGroup]:
    """The paper's two groups: recurrent weights, and the fully connected layer (output left dense)."""
    extra = {"final_sparsity": final_sparsity} if final_sparsity is not None else {}
    return [
        PruneGroup(schedule, include=RECURRENT_WEIGHTS, block=block, name="recurrent", **extra),
        PruneGroup(schedule, include=r"^fc\.weight$", block=block, name="fc", **extra),
    ]


def pruned_fraction(pruner: MagnitudePruner) -> float:
    rows = pruner.report()
    return sum(r.pruned for r in rows) / sum(r.total for r in rows)


def finetune(base: nn.Module, task: SpeechTask, groups: list[PruneGroup], steps: int, seed: int) -> dict:
    model = copy.deepcopy(base)
    pruner = MagnitudePruner(groups)
    pruner.prepare(model)
    train(model, task, TrainConfig(steps=steps, lr=5e-4, grad_clip=5.0, seed=seed), pruner, progress=True)
    reached = pruned_fraction(pruner)
    return {**task.evaluate(pruner.finalize()), "sparsity": reached}


def methods(sparsity: float, steps: int) -> dict[str, list[PruneGroup]]:
    end = int(steps * 0.6)
    return {
        "gradual (threshold)": pruning_groups(ThresholdSchedule(start_itr=0, ramp_itr=end // 2, end_itr=end,
                                                                freq=max(1, steps // 60)), sparsity),
        "gradual (cubic)": pruning_groups(CubicSchedule(sparsity, start_itr=1, n_steps=10, delta_t=max(1, end // 10))),
        "hard (one-shot)": pruning_groups(OneShot(sparsity)),
    }


def summarize(runs: list[dict]) -> dict:
    """Mean and sample spread over the finished ``runs``; a worker's :data:`PENDING` runs (busy in
    another worker: only its summary is partial, the run log is not) are counted, not averaged."""
    done = [r for r in runs if not r.get("pending")]
    cers = [r["cer"] for r in done]

    def mean(values: list[float]) -> float:
        return statistics.mean(values) if values else math.nan

    return {"cer_mean": mean(cers), "cer_std": statistics.stdev(cers) if len(cers) > 1 else 0.0,
            "wer_mean": mean([r["wer"] for r in done]),
            "sparsity_mean": mean([r.get("sparsity", 0.0) for r in done]),
            "pending": len(runs) - len(done), "runs": done}


def gradual_vs_hard(base: nn.Module, task: SpeechTask, size: Size, log: RunLog | None = None) -> dict:
    log = log or RunLog()
    results = {}
    for sparsity in size.sparsities:
        for label, groups in methods(sparsity, size.finetune_steps).items():
            runs = [log.run(f"gradual_vs_hard/{sparsity:g}/{label}/{seed}",
                            lambda g=groups, s=seed: finetune(base, task, g, size.finetune_steps, s))
                    for seed in size.seeds]
            results.setdefault(f"{sparsity:g}", {})[label] = summarize(runs)
    return results


def block_vs_unstructured(base: nn.Module, task: SpeechTask, size: Size, log: RunLog | None = None,
                          sparsity: float = 0.9) -> dict:
    log = log or RunLog()
    end = int(size.finetune_steps * 0.6)
    schedule = CubicSchedule(sparsity, start_itr=1, n_steps=10, delta_t=max(1, end // 10))
    results = {}
    for block in (BlockShape(1, 1), BlockShape(4, 4), BlockShape(16, 1)):
        runs = [log.run(f"block_vs_unstructured/{block}/{seed}",
                        lambda b=block, s=seed: finetune(base, task, pruning_groups(schedule, block=b),
                                                         size.finetune_steps, s))
                for seed in size.seeds]
        results[str(block)] = summarize(runs)
    return results


def recurrent_nonzeros(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for n, p in model.named_parameters() if re.search(RECURRENT_WEIGHTS, n))


def recurrent_weight_count(hidden: int) -> int:
    """Recurrent weights of a dense ``ds2-mini`` of width ``hidden`` (built on the meta device:
    shapes only, no memory, no initialization)."""
    with torch.device("meta"):
        model = build_model("ds2-mini", hidden=hidden)
    return sum(p.numel() for n, p in model.named_parameters() if re.search(RECURRENT_WEIGHTS, n))


def large_sparse_vs_small_dense(task: SpeechTask, size: Size, dense_steps: int, log: RunLog | None = None,
                                sparsity: float = 0.9) -> dict:
    """Both trained from scratch for ``dense_steps + finetune_steps``."""
    steps = dense_steps + size.finetune_steps
    large = build_model("ds2-mini")
    hidden_large = 256
    # a GRU layer's recurrent weights grow ~ hidden² + hidden·input: pick the hidden size whose
    # dense weight count matches the large model's non-zero count
    target = (1 - sparsity) * recurrent_nonzeros(large)
    hidden_small = min(range(8, hidden_large), key=lambda h: abs(recurrent_weight_count(h) - target))

    def trained(hidden: int, prune: bool, seed: int) -> dict:
        torch.manual_seed(seed)
        model = build_model("ds2-mini", hidden=hidden)
        pruner = None
        if prune:
            end = int(steps * 0.6)
            pruner = MagnitudePruner(pruning_groups(CubicSchedule(sparsity, start_itr=steps // 10, n_steps=10,
                                                                  delta_t=max(1, (end - steps // 10) // 10))))
            pruner.prepare(model)
        train(model, task, TrainConfig(steps=steps, lr=2e-3, cosine=True, grad_clip=5.0, seed=seed), pruner)
        if pruner is not None:
            model = pruner.finalize()
        return {**task.evaluate(model), "recurrent_nonzeros": recurrent_nonzeros(model), "hidden": hidden}

    log = log or RunLog()
    results = {}
    for label, hidden, prune in (("large sparse", hidden_large, True), ("small dense", hidden_small, False)):
        results[label] = summarize([log.run(f"large_sparse_vs_small_dense/{label}/{seed}",
                                            lambda h=hidden, p=prune, s=seed: trained(h, p, s))
                                    for seed in size.seeds])
    return results


def to_markdown(result: dict) -> str:
    lines = [f"# Pruning accuracy experiments ({result['task']}, {result['size']})", "",
             f"Base: `{result['base']}` (dense test CER {result['dense']['cer']:.2%}). Fine-tuning: "
             f"{result['finetune_steps']} steps, seeds {result['seeds']}. CER on the test split (held-out voices), "
             "mean ± standard deviation over seeds. Regenerate with `python -m bench.accuracy`.", "",
             "## Gradual vs hard pruning", "", "| sparsity | method | reached sparsity | CER | WER |",
             "| --- | --- | --- | --- | --- |"]
    for sparsity, by_method in result["gradual_vs_hard"].items():
        for label, s in by_method.items():
            lines.append(f"| {float(sparsity):.0%} | {label} | {s['sparsity_mean']:.1%} | "
                         f"{s['cer_mean']:.2%} ± {s['cer_std']:.2%} | {s['wer_mean']:.2%} |")
    lines += ["", "Paper (Narang et al. 2017, their own numbers): gradual pruning 7–9 % better than hard pruning.",
              "", "## Block vs unstructured (90 %, cubic schedule)", "", "| block | CER | WER |", "| --- | --- | --- |"]
    for block, s in result["block_vs_unstructured"].items():
        lines.append(f"| {block} | {s['cer_mean']:.2%} ± {s['cer_std']:.2%} | {s['wer_mean']:.2%} |")
    if "large_sparse_vs_small_dense" in result:
        lines += ["", "## Large sparse vs small dense (same non-zero recurrent weights)", "",
                  "| model | hidden | recurrent non-zeros | CER |", "| --- | --- | --- | --- |"]
        for label, s in result["large_sparse_vs_small_dense"].items():
            run = s["runs"][0]
            lines.append(f"| {label} | {run['hidden']} | {run['recurrent_nonzeros']:,} | "
                         f"{s['cer_mean']:.2%} ± {s['cer_std']:.2%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sparsities = list(result["gradual_vs_hard"])
    labels = list(next(iter(result["gradual_vs_hard"].values())))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        means = [100 * result["gradual_vs_hard"][s][label]["cer_mean"] for s in sparsities]
        stds = [100 * result["gradual_vs_hard"][s][label]["cer_std"] for s in sparsities]
        ax.bar([j + i * width for j in range(len(sparsities))], means, width, yerr=stds, label=label, capsize=3)
    ax.axhline(100 * result["dense"]["cer"], color="black", linestyle="--", label="dense")
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(sparsities))],
                  [f"{float(s):.0%}" for s in sparsities])
    ax.set_xlabel("target sparsity of recurrent + FC weights")
    ax.set_ylabel("test CER (%)")
    ax.set_title(f"Gradual vs hard pruning, {result['task']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(size: Size, with_large_sparse: bool, quick: bool, log: RunLog, threads: int = 2) -> dict:
    """Every experiment on ``size.corpus``, starting from the shipped ``ds2-mini-<kind>`` checkpoint;
    runs already in ``log`` are not run again."""
    torch.set_num_threads(threads)
    task = SpeechTask(size.corpus, batch_size=32, eval_limit=size.eval_limit)
    checkpoint = f"ds2-mini-{size.corpus.kind}"
    base = load_pretrained(checkpoint)
    result = {
        "task": task.name, "size": "quick" if quick else "full", "base": checkpoint,
        "dense": log.run("dense", lambda: task.evaluate(base)), "finetune_steps": size.finetune_steps,
        "seeds": list(size.seeds),
        "gradual_vs_hard": gradual_vs_hard(base, task, size, log),
        "block_vs_unstructured": block_vs_unstructured(base, task, size, log),
    }
    if with_large_sparse:
        result["large_sparse_vs_small_dense"] = large_sparse_vs_small_dense(
            task, size, RECIPES[checkpoint].config.steps, log)
    result["seconds"] = round(sum(r["seconds"] for r in log.runs.values()), 1)
    result["cpu_seconds"] = round(sum(r.get("cpu_seconds", r["seconds"]) for r in log.runs.values()), 1)
    result["machine"] = machine_info(torch.get_num_threads())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, seeds and sparsities (minutes)")
    parser.add_argument("--skip-large-sparse", action="store_true", help="skip experiment 2 (trains from scratch)")
    parser.add_argument("--task", choices=sorted(STANDARD_CORPORA), default="digits",
                        help="digits (saturates: CI-sized) or sentences (KJV fragments: where pruning costs show)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 on a machine shared with other work: 2 threads then spin and crawl)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs logged by an earlier, interrupted run with the same options")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes running different runs side by side (each with --threads "
                             "threads), sharing the run log; then the report is written from it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    size = sized(QUICK if args.quick else FULL, args.task)
    stem = f"accuracy-speech-{args.task}" + ("-quick" if args.quick else "")
    log_path = args.out / f"{stem}.runs.json"
    if not args.resume and not args.worker:
        log_path.unlink(missing_ok=True)
    if args.worker:
        run(size, not args.skip_large_sparse, args.quick, RunLog(log_path, shared=True), args.threads)
        return
    if args.jobs > 1:
        run_workers(args.jobs)
    result = run(size, not args.skip_large_sparse, args.quick, RunLog(log_path), args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(to_markdown(result))


def run_workers(jobs: int) -> None:
    """``jobs`` copies of this command as workers on one shared run log; returns when all are done
    (runs a failed worker left undone are then run by the caller)."""
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    command = [sys.executable, "-m", "bench.accuracy", *argv, "--resume", "--worker"]
    workers = [subprocess.Popen(command) for _ in range(jobs)]
    codes = [w.wait() for w in workers]
    if any(codes):
        print(f"warning: worker exit codes {codes}; the runs they left are run here", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
