"""Small trained checkpoints shipped in the repository, and the recipes that reproduce them.

Each checkpoint is a ``state_dict`` stored in float16 (half the size; the float16 rounding is
part of the shipped model and the recorded metrics are measured after it) beside a JSON card
with the model, the task, the training settings, the seed, the command that reproduces it, the
metrics on the held-out split and the training time.  Reproduce one with::

    python -m compressor.zoo.pretrained train ds2-mini-digits

Loading never unpickles code: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..tasks.base import Task
from ..training import TrainConfig, save_atomic, train

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"


@dataclass(frozen=True)
class Recipe:
    """How a shipped checkpoint is made: model, task and training settings."""

    model: str
    model_kwargs: dict
    task: Callable[[], Task]
    config: TrainConfig


def _speech_digits() -> Task:
    from ..tasks.speech import STANDARD_CORPORA, SpeechTask

    return SpeechTask(STANDARD_CORPORA["digits"], batch_size=32)


def _speech_sentences() -> Task:
    from ..tasks.speech import STANDARD_CORPORA, SpeechTask

    return SpeechTask(STANDARD_CORPORA["sentences"], batch_size=32)


def _fashion_mnist() -> Task:
    from ..tasks.images import ImageTask

    return ImageTask("fashion-mnist", batch_size=128)


def _charlm() -> Task:
    from ..tasks.charlm import CharLMTask

    return CharLMTask(seq_len=128, batch_size=32)


RECIPES: dict[str, Recipe] = {
    "ds2-mini-digits": Recipe("ds2-mini", {}, _speech_digits,
                              TrainConfig(steps=1000, lr=2e-3, cosine=True, grad_clip=5.0, seed=0, threads=2)),
    "ds2-mini-sentences": Recipe("ds2-mini", {}, _speech_sentences,
                                 TrainConfig(steps=2400, lr=2e-3, cosine=True, grad_clip=5.0, seed=0, threads=1)),
    "resnet8-fashion-mnist": Recipe("resnet8", {}, _fashion_mnist,
                                    TrainConfig(steps=3000, lr=3e-3, cosine=True, weight_decay=1e-4, seed=0, threads=2)),
    "charlm-gru-kjv": Recipe("charlm", {"hidden": 512}, _charlm,
                             TrainConfig(steps=2500, lr=3e-3, cosine=True, grad_clip=1.0, seed=0, threads=2)),
}


def card_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.json"


def weights_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.pt"


def _build(recipe: Recipe) -> nn.Module:
    from . import build_model

    return build_model(recipe.model, **recipe.model_kwargs)


def load_pretrained(name: str) -> nn.Module:
    """The shipped trained model ``name`` (float32, eval mode)."""
    if name not in RECIPES:
        raise ValueError(f"unknown checkpoint {name!r}: choose one of {', '.join(sorted(RECIPES))}")
    path = weights_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reproduce it with "
                                f"`python -m compressor.zoo.pretrained train {name}`")
    model = _build(RECIPES[name])
    state = torch.load(path, weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def load_card(name: str) -> dict:
    return json.loads(card_path(name).read_text())


def train_pretrained(name: str, progress: bool = True) -> dict:
    """Train checkpoint ``name`` from scratch with its recipe; write weights and card; return the card."""
    recipe = RECIPES[name]
    task = recipe.task()
    model = _build(recipe)
    start = time.time()
    train(model, task, recipe.config, progress=progress, desc=name)
    seconds = time.time() - start
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    metrics = task.evaluate(model)
    extra = {"flite": task.evaluate(model, "flite")} if hasattr(task, "corpus") and "flite" in task.corpus else {}
    card = {
        "name": name,
        "model": recipe.model,
        "model_kwargs": recipe.model_kwargs,
        "task": task.name,
        "train_config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(recipe.config).items()},
        "command": f"python -m compressor.zoo.pretrained train {name}",
        "metrics": metrics,
        **({"metrics_other_splits": extra} if extra else {}),
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": {"cpu_count": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    save_atomic(half, weights_path(name))
    card_path(name).write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reproduce the shipped checkpoints.")
    parser.add_argument("action", choices=["train", "list"])
    parser.add_argument("names", nargs="*", help=f"checkpoints (default: all): {', '.join(RECIPES)}")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name in RECIPES:
            status = json.dumps(load_card(name)["metrics"]) if card_path(name).exists() else "(not trained)"
            print(f"{name:24s} {status}")
        return
    for name in args.names or list(RECIPES):
        print(json.dumps(train_pretrained(name), indent=2))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
