"""The ``compress-and-export`` command line (click): a thin layer over the library."""

from __future__ import annotations

import click
import torch


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Prune, pack, quantize and export trained PyTorch models.

    Without a sub-command, runs the embedded default job (``demo``).

    \b
    Examples:
      compress-and-export                  # the embedded default
      compress-and-export demo --sparsity 0.8 --threads 2
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(demo)


@main.command()
@click.option("--sparsity", default=0.9, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Final sparsity of the pruned layers.")
@click.option("--dense-steps", default=1500, show_default=True, type=click.IntRange(1), help="Dense training steps.")
@click.option("--prune-steps", default=1500, show_default=True, type=click.IntRange(20),
              help="Training steps while pruning (schedules end at 75 %, then fine-tuning).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=None, type=click.IntRange(1), help="torch.set_num_threads (default: torch's).")
def demo(sparsity: float, dense_steps: int, prune_steps: int, seed: int, threads: int | None) -> None:
    """Train a GRU on the adding problem, prune it gradually (Narang threshold and cubic schedules)
    and one-shot, and print per-layer sparsity and held-out error."""
    from .demo import format_demo, run_pruning_demo

    if threads:
        torch.set_num_threads(threads)
    result = run_pruning_demo(sparsity=sparsity, dense_steps=dense_steps, prune_steps=prune_steps, seed=seed)
    click.echo(format_demo(result))
