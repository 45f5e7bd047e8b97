"""A plain training loop with the pruner driven inside it, the way users write their own.

``train(model, task, TrainConfig(...), pruner)`` runs Adam on ``task.loss`` for ``steps``
optimizer steps, calls ``pruner.step()`` after each, shows a progress bar, and — with
``checkpoint`` set — saves model, optimizer, pruner, step counter and random-number state every
``checkpoint_every`` steps, at the end and on Ctrl-C (written to a temporary file, then renamed).
Started again with the same checkpoint path it resumes, and ends with the same weights and masks
as an uninterrupted run with the same seed.  A step (batch, forward — which moves BatchNorm
statistics —, backward, optimizer, pruner, counters) is never cut in half: a Ctrl-C that arrives
during it is held until the step is done.  After SIGKILL the last periodic checkpoint is the
resume point.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .pruner import MagnitudePruner
from .tasks.base import Task


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer steps, Adam settings (cosine decay to ``lr·final_lr_fraction`` when
    ``cosine``), gradient clipping by global norm, seed, threads and checkpointing."""

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    cosine: bool = False
    final_lr_fraction: float = 0.05
    grad_clip: float | None = None
    seed: int = 0
    threads: int | None = None
    checkpoint: Path | None = None
    checkpoint_every: int = 200


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)


def _lr_at(config: TrainConfig, step: int) -> float:
    if not config.cosine:
        return config.lr
    floor = config.lr * config.final_lr_fraction
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to ``path.tmp`` then rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it at the end, so that the
    block runs whole (in the main thread; elsewhere signals cannot be caught and this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[object] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _rng_state(generator: torch.Generator) -> dict:
    return {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}


def _state(step, model, optimizer, pruner, rng: dict, losses) -> dict:
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "pruner": pruner.state_dict() if pruner is not None else None,
        **rng,
        "losses": losses,
    }


def train(model: nn.Module, task: Task, config: TrainConfig, pruner: MagnitudePruner | None = None,
          progress: bool = True, desc: str | None = None) -> TrainResult:
    """Train ``model`` in place (a pruner, if given, must already be prepared on it)."""
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(model, task, config, pruner, progress, desc)
    finally:
        torch.set_num_threads(threads_before)


def _train(model: nn.Module, task: Task, config: TrainConfig, pruner: MagnitudePruner | None, progress: bool,
           desc: str | None) -> TrainResult:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start, losses = 0, []
    if config.checkpoint is not None and Path(config.checkpoint).exists():
        state = torch.load(config.checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if pruner is not None:
            pruner.load_state_dict(state["pruner"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, losses = state["step"], list(state["losses"])
    batches = task.batches(generator)
    model.train()
    step = start
    bar = tqdm(total=config.steps, initial=start, desc=desc or task.name, disable=not progress, leave=False)
    rng = _rng_state(generator)  # the state the next step starts from
    try:
        while step < config.steps:
            # a whole step or none: its forward already moves BatchNorm statistics, its update the
            # weights, the masks and the counters
            with deferred_interrupt():
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(config, step)
                loss = task.loss(model, next(batches))
                optimizer.zero_grad()
                loss.backward()
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                if pruner is not None:
                    pruner.step()
                step += 1
                losses.append(float(loss.detach()))
                rng = _rng_state(generator)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if config.checkpoint is not None and step % config.checkpoint_every == 0:
                save_atomic(_state(step, model, optimizer, pruner, _rng_state(generator), losses), config.checkpoint)
    except KeyboardInterrupt:  # a Ctrl-C lands between two whole steps
        if config.checkpoint is not None:
            save_atomic(_state(step, model, optimizer, pruner, rng, losses), config.checkpoint)
        raise
    finally:
        bar.close()
    if config.checkpoint is not None:
        save_atomic(_state(step, model, optimizer, pruner, _rng_state(generator), losses), config.checkpoint)
    model.eval()
    return TrainResult(step, start, losses)
