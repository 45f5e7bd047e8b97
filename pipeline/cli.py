"""The ``compress-and-export`` command line: a thin click layer over :mod:`pipeline`.

Exit codes: 0 success; 1 a check failed (parity outside its tolerance); 2 bad usage or bad input
(a one-line error names the problem and the fix; ``--debug`` shows the traceback); 130
interrupted (Ctrl-C; the fine-tuning state is kept for ``--resume``).  A command that fails
writes nothing into ``--out`` and leaves earlier files there as they were.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import torch

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

RUN_OPTIONS = [
    click.argument("checkpoint", required=False),
    click.option("--model", "model", help="Zoo model name, or a factory module.path:function / file.py:function."),
    click.option("--recipe", help="A TOML recipe file or a shipped recipe name (see `zoo`)."),
    click.option("--format", "formats", type=click.Choice(["onnx", "tvm", "both"]), help="Artifacts to export."),
    click.option("--target", "targets", multiple=True, help="TVM target: host, aarch64-linux or android (repeatable)."),
    click.option("--int8/--fp32", "int8", default=None, help="Quantize the packed weights to int8 (default: the recipe's)."),
    click.option("--activations", type=click.Choice(["fp32", "int8"]),
                 help="int8: the TVM library quantizes the inputs of 16x1-block int8 matmuls at run time (x86 VNNI)."),
    click.option("--sparsity", type=float, help="Final sparsity of the pruned weights, in [0, 1)."),
    click.option("--block", help="Block shape of the pruning and packing, e.g. 16x1 (1x1: unstructured)."),
    click.option("--method", type=click.Choice(["gradual", "cubic", "hard", "taylor", "none"]), help="Pruning method."),
    click.option("--steps", type=int, help="Fine-tuning steps during which the model is pruned."),
    click.option("--data", help="Task: speech-digits, speech-sentences, fashion-mnist, digits, charlm, none or module:function."),
    click.option("--input-shape", "input_shapes", multiple=True, help="Example input shape (repeatable), e.g. 1,1,64,100 or 2,35:int64."),
    click.option("--device", help="Time the TVM library on a device: rpc://host:port or tracker://host:port/key."),
    click.option("--threads", type=int, help="Threads for PyTorch, ONNX Runtime and TVM (default: the recipe's)."),
    click.option("--trust-checkpoint", is_flag=True, help="Allow a fully pickled module (unpickling runs its code)."),
    click.option("--out", default="compress-out", show_default=True, type=click.Path(file_okay=False), help="Output folder."),
    click.option("--quiet", is_flag=True, help="No progress bars."),
    click.option("--debug", is_flag=True, help="Show the traceback of an error."),
]
FINE_TUNING_OPTIONS = [*RUN_OPTIONS,
                       click.option("--resume", is_flag=True, help="Continue the interrupted fine-tuning kept in OUT/.resume.")]


def with_options(options):
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


class DefaultGroup(click.Group):
    """A group whose first argument, when it is not a sub-command, goes to ``run``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def fail(error: BaseException, debug: bool) -> None:
    """Print the one-line error (or the traceback with --debug) and exit with EXIT_BAD_INPUT."""
    if debug:
        traceback.print_exception(error)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@contextmanager
def reported_errors(debug: bool, out: str | None = None) -> Iterator[None]:
    """Turn the errors of a command into the documented one-line messages and exit codes."""
    try:
        yield
    except KeyboardInterrupt:
        kept = out is not None and (Path(out) / ".resume" / "train-state.pt").exists()
        click.echo("interrupted: " + ("the fine-tuning state is kept; run the same command with --resume to continue"
                                      if kept else "nothing was written"), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError, TimeoutError, OSError) as error:
        fail(error, debug)


def build_recipe(recipe: str | None, **options):
    from .recipe import load_recipe

    formats = {"both": ["onnx", "tvm"], "onnx": ["onnx"], "tvm": ["tvm"]}.get(options.get("formats") or "")
    overrides = {
        "model__name": options.get("model") if options.get("model") and ":" not in options["model"] else None,
        "model__factory": options.get("model") if options.get("model") and ":" in options["model"] else None,
        "model__trust_checkpoint": True if options.get("trust_checkpoint") else None,
        "export__formats": formats,
        "export__targets": list(options["targets"]) if options.get("targets") else None,
        "export__device": options.get("device"),
        "export__activations": options.get("activations"),
        "pack__int8": options.get("int8"),
        "prune__sparsity": options.get("sparsity"),
        "prune__block": options.get("block"),
        "prune__method": options.get("method"),
        "prune__steps": options.get("steps"),
        "data__task": options.get("data"),
        "data__input_shapes": list(options["input_shapes"]) if options.get("input_shapes") else None,
        "check__threads": options.get("threads"),
    }
    checkpoint = options.get("checkpoint")
    if checkpoint is not None:
        overrides["model__checkpoint"] = checkpoint
        from compressor.zoo.pretrained import RECIPES

        if checkpoint in RECIPES and not options.get("model"):  # a shipped checkpoint names its model
            overrides["model__name"] = RECIPES[checkpoint].model
    elif options.get("model"):  # a model of the user's without a checkpoint: its own (untrained) weights
        overrides["model__checkpoint"] = ""
    loaded = load_recipe(recipe)
    return loaded.override(**overrides)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Prune, pack, quantize and export a trained PyTorch model, then prove the result.

    Without a sub-command, runs every stage (`run`); with no argument at all, the embedded
    default: the shipped Deep-Speech-2-family model (ds2-mini) on spoken digits, pruned
    gradually to 90 % while fine-tuned, packed in int8, exported to ONNX and a TVM library for
    this CPU, checked (parity, CER, latency, size) and reported in ./compress-out.

    \b
    Examples:
      compress-and-export                                   # the embedded default
      compress-and-export --recipe block-16x1 --out out/b16
      compress-and-export model.pt --model my_pkg.nets:build --data none --input-shape 1,3,32,32 \\
          --method hard --sparsity 0.8 --format both
      compress-and-export resnet8-fashion-mnist --data fashion-mnist --method hard --format onnx
      compress-and-export zoo                               # models, checkpoints, recipes
      compress-and-export check out/model.onnx --input-shape 1,1,64,100
    """


@main.command()
@with_options(FINE_TUNING_OPTIONS)
def run(checkpoint, out, quiet, debug, recipe, resume, **options) -> None:
    """Every stage: load → prune → pack → export → check → report (report.json, report.md, PNGs)."""
    from .report import format_summary
    from .run import run as run_job

    with reported_errors(debug, out):
        built = build_recipe(recipe, checkpoint=checkpoint, **options)
        report = run_job(built, out, progress=not quiet, resume=resume)
    click.echo(format_summary(report))
    for name, kind in report["prune"].get("left_dense", {}).items():
        click.echo(f"note: left dense (not prunable by {built.prune.method}): {name} ({kind})")
    click.echo(f"report: {Path(out) / 'report.md'} (and report.json, *.png)")
    if not report["checks_passed"]:
        click.echo("error: an artifact's outputs differ from PyTorch beyond their tolerance (see the parity rows)", err=True)
        sys.exit(EXIT_CHECK_FAILED)


@main.command()
@with_options(FINE_TUNING_OPTIONS)
def prune(checkpoint, out, quiet, debug, recipe, resume, **options) -> None:
    """Prune (with fine-tuning on --data) and save the finalized state_dict as OUT/pruned.pt, or —
    for --method taylor — the shrunk model as a torch.export program OUT/pruned.pt2."""
    from compressor.taylor import save_shrunk

    from . import stages
    from .checkpoint import load_recipe_model
    from .workspace import OutputFolder

    with reported_errors(debug, out):
        built = build_recipe(recipe, checkpoint=checkpoint, **options)
        model, examples = load_recipe_model(built.model)
        task = stages.make_task(built.data, not quiet)
        inputs = stages.example_inputs(task, built.data, examples) if built.prune.method == "taylor" else None
        stages.validate_model(model, inputs)
        folder = OutputFolder(out)
        with folder as work:
            state = folder.resume_checkpoint(stages.fine_tuning_settings(built), resume)
            result = stages.prune_model(model, task, built.prune, built.check.threads, not quiet, inputs, state)
            if result.structured:  # batch 2: an example of batch 1 would fix the batch size
                path = folder.final(save_shrunk(result.model, stages.batched(inputs, 2), work / "pruned.pt2"))
            else:
                path = folder.final(work / "pruned.pt")
                torch.save(result.model.state_dict(), work / "pruned.pt")
    what = "of the parameters (whole units)" if result.structured else "of the prunable weights"
    for name, kind in result.record.get("left_dense", {}).items():
        click.echo(f"note: left dense (not prunable by {built.prune.method}): {name} ({kind})")
    click.echo(f"pruned {result.record['sparsity_reached']:.1%} {what} → {path}")


@main.command()
@with_options(RUN_OPTIONS)
def pack(checkpoint, out, quiet, debug, recipe, **options) -> None:
    """Pack a (pruned) checkpoint — CSR / BSR / bit-mask, fp32 or int8 — into OUT/packed.npz and
    print its size table (compressor.packed_model.load_packed reads it back)."""
    from compressor.packed_model import save_packed
    from compressor.size import format_size_report, size_report

    from . import stages
    from .checkpoint import load_recipe_model
    from .workspace import OutputFolder

    with reported_errors(debug, out):
        built = build_recipe(recipe, checkpoint=checkpoint, **options)
        model, _ = load_recipe_model(built.model)
        stages.validate_model(model)
        packed = stages.pack(model, built.pack, built.prune)
        folder = OutputFolder(out)
        with folder as work:
            path = folder.final(save_packed(packed, work / "packed.npz"))
    click.echo(format_size_report(size_report(packed)))
    click.echo(f"packed weights → {path}")


@main.command()
@with_options(RUN_OPTIONS)
def export(checkpoint, out, quiet, debug, recipe, **options) -> None:
    """Pack a (pruned) checkpoint and export it — no pruning, no training."""
    from compressor.size import format_size_report, size_report

    from . import stages
    from .checkpoint import load_recipe_model
    from .workspace import OutputFolder

    with reported_errors(debug, out):
        built = build_recipe(recipe, checkpoint=checkpoint, **options)
        model, examples = load_recipe_model(built.model)
        task = stages.make_task(built.data, not quiet) if not built.data.input_shapes and examples is None else None
        inputs = stages.example_inputs(task, built.data, examples)
        stages.validate_model(model, inputs)
        packed = stages.pack(model, built.pack, built.prune)
        click.echo(format_size_report(size_report(packed)))
        written = []
        folder = OutputFolder(out)
        with folder as work:
            if "onnx" in built.export.formats:
                axes = stages.dynamic_axes_for(built.data.task, len(inputs))
                written.append(("onnx", stages.export_onnx_artifact(model, inputs, work, built.pack.int8, axes)))
            if "tvm" in built.export.formats:
                for target in built.export.targets:
                    written.append((f"tvm {target}", stages.export_tvm_artifact(packed, inputs, work, target,
                                                                                 activations=built.export.activations)))
        for name, artifact in written:
            click.echo(f"{name}: {folder.final(artifact['path'])} ({artifact['size_bytes']} bytes)")


@main.command()
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--input-shape", "input_shapes", multiple=True, required=True, help="e.g. 1,1,64,100 or 2,35:int64")
@click.option("--device", help="rpc://host:port: run a TVM library there.")
@click.option("--debug", is_flag=True)
def check(artifact, input_shapes, device, debug) -> None:
    """Run an artifact (.onnx in ONNX Runtime, .so in TVM) on random inputs of the given shapes."""
    args = [artifact, *(a for s in input_shapes for a in ("--input-shape", s))]
    try:
        if artifact.endswith(".onnx"):
            from runtime_tests.onnxruntime_check import main as check_onnx

            check_onnx([*args, "--time-session"])
        else:
            from runtime_tests.tvm_check import main as check_tvm

            check_tvm([*args, *(["--device", device] if device else [])])
    except Exception as error:  # noqa: BLE001 - runtimes raise their own types; all are bad input here

        fail(error, debug)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False))
def report(out) -> None:
    """Re-draw report.md and the plots of an output folder from its report.json."""
    from .report import format_summary, write_report

    data = json.loads((Path(out) / "report.json").read_text())
    write_report(data, Path(out))
    click.echo(format_summary(data))


@main.command()
@click.argument("name", type=click.Choice(["kernels", "onnx", "sizes", "accuracy"]))
@click.option("--quick", is_flag=True, help="The minutes-long version.")
def bench(name, quick) -> None:
    """Run one benchmark of bench/ (tables + bench/results/*.json, .md, .png)."""
    if name == "kernels":
        from bench.tvm_kernels import main as run_bench
    elif name == "onnx":
        from bench.onnx_latency import main as run_bench
    elif name == "sizes":
        from bench.sizes import main as run_bench
    else:
        from bench.accuracy import main as run_bench
    sys.argv = [f"bench.{name}", *(["--quick"] if quick and name != "sizes" else [])]
    run_bench()


@main.command()
def zoo() -> None:
    """The built-in models, shipped checkpoints (with their metrics) and shipped recipes."""
    from compressor.zoo import MODELS
    from compressor.zoo.pretrained import RECIPES, card_path, load_card

    from .recipe import shipped_recipes

    click.echo("models:      " + ", ".join(sorted(MODELS)))
    for name in RECIPES:
        metrics = load_card(name)["metrics"] if card_path(name).exists() else "(not trained)"
        click.echo(f"checkpoint:  {name:24s} {json.dumps(metrics)}")
    click.echo("recipes:     " + ", ".join(shipped_recipes()))


@main.command()
@click.option("--sparsity", default=0.9, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True))
@click.option("--dense-steps", default=1500, show_default=True, type=click.IntRange(1))
@click.option("--prune-steps", default=1500, show_default=True, type=click.IntRange(20))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=None, type=click.IntRange(1))
def demo(sparsity, dense_steps, prune_steps, seed, threads) -> None:
    """The adding-problem demo: a GRU pruned by three schedules (a minute)."""
    from compressor.demo import format_demo, run_pruning_demo

    if threads:
        torch.set_num_threads(threads)
    click.echo(format_demo(run_pruning_demo(sparsity=sparsity, dense_steps=dense_steps, prune_steps=prune_steps, seed=seed)))
