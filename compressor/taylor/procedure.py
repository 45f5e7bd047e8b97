"""The pruning procedure of Molchanov et al. (2019), section 3.3, on a :class:`~compressor.tasks.base.Task`.

Fine-tune with Adam; after every minibatch the pruner accumulates importance; every ``every``
minibatches it removes the ``per_prune`` least important units; fine-tuning goes on in between
and after the target is met (``TaylorPruner(every=..., per_prune=..., target=...)``).  Works
the same from :func:`compressor.training.train` (which calls ``pruner.step()``); this loop adds
``pruner.backward`` (needed by the second-order criterion) and a curve of (parameters, FLOPs,
metric) points for the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..tasks.base import Task
from .pruner import TaylorPruner


def prune_finetune(model: nn.Module, task: Task, pruner: TaylorPruner, steps: int, lr: float = 1e-3,
                   weight_decay: float = 0.0, grad_clip: float | None = None, seed: int = 0,
                   evaluate: Callable[[nn.Module], dict[str, float]] | None = None, eval_every: int = 1,
                   progress: bool = False, desc: str | None = None) -> list[dict[str, Any]]:
    """Run ``steps`` fine-tuning steps on a prepared ``model`` (in place).

    Returns curve points ``{"step", "params", "flops", "units", *_fraction, **evaluate(model)}``:
    at the start, just before every ``eval_every``-th pruning round (so each point is the model
    left by the previous round after ``pruner.every`` fine-tuning steps, BatchNorm statistics
    caught up), after the last round's fine-tuning and at the end.  ``evaluate`` defaults to
    ``task.evaluate``; it runs on the masked model, which computes what the shrunk one does."""
    evaluate = evaluate or task.evaluate
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    batches = task.batches(generator)

    def point(step: int) -> dict[str, Any]:
        values = {"step": step, **pruner.remaining(), **evaluate(model)}
        model.train()
        return values

    curve = [point(0)]
    rounds = 0
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc or "prune+finetune", disable=not progress, leave=False):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        pruner.backward(loss)
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        due = bool(pruner.every) and (pruner.itr + 1) % pruner.every == 0 and not pruner.done
        if due and step > 1 and (rounds + 1) % eval_every == 0 and curve[-1]["step"] != step:
            curve.append(point(step))
        if pruner.step():
            rounds += 1
    if curve[-1]["step"] != steps:
        curve.append(point(steps))
    model.eval()
    return curve
