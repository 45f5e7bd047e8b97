"""Models built by name: ``build_model("ds2")``."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from .charlm import CharLM
from .resnet import ResNet, resnet8, resnet20
from .ds2 import RECURRENT_WEIGHTS, DeepSpeech2, SharedInputBiRecurrent, SummedBiRecurrent

MODELS: dict[str, Callable[..., nn.Module]] = {
    # the paper's model: 67.7 M parameters, 270.8 MB fp32
    "ds2": partial(DeepSpeech2, n_freq=161, hidden=1760, layers=7, cell="rnn"),
    # the same with GRU cells (3 gates: about 3x the recurrent parameters)
    "ds2-gru": partial(DeepSpeech2, n_freq=161, hidden=1760, layers=7, cell="gru"),
    # a width that trains on 2 CPU cores: 64 log-mel bins, 2 bidirectional nn.GRU layers of 256
    "ds2-mini": partial(DeepSpeech2, n_freq=64, hidden=256, layers=2, cell="gru", shared_input=False),
    # CIFAR-style residual networks with BatchNorm (He et al. 2016), 1-channel 28x28 input
    "resnet8": resnet8,
    "resnet20": resnet20,
    # character language model: embedding → GRU/LSTM → output (the vocabulary of the KJV text)
    "charlm": partial(CharLM, vocab_size=63),
}


def build_model(name: str, **overrides) -> nn.Module:
    """A fresh (untrained) model of the zoo; keyword arguments override its defaults."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](**overrides)


__all__ = ["MODELS", "RECURRENT_WEIGHTS", "CharLM", "DeepSpeech2", "ResNet", "SharedInputBiRecurrent", "SummedBiRecurrent",
           "build_model"]
