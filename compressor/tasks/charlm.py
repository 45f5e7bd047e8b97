"""Character-level language modelling of the King James Bible (the char-RNN setting of Graves
2013 and Karpathy 2015).

The text is the whole Bible (:func:`compressor.tasks.text.king_james_verses`), verses joined
with ``"\\n"`` in canonical order: 4,137,848 characters over 63 symbols.  The last
``test_fraction`` of the characters (from :func:`compressor.tasks.text.split_point` on) is the
held-out ``test`` split, the rest is ``train``.  The model reads characters ``c_1 … c_T`` and
predicts ``c_2 … c_{T+1}``; the metric is bits per character,

    bpc = −(1/N) Σ_t log₂ p(c_{t+1} | c_1 … c_t) = (mean cross-entropy in nats) / ln 2.

Predicting every character from its training frequency gives the unigram entropy
(about 4.36 bits); a small GRU gets well below 3 bits within a few hundred steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .metrics import bits_per_character
from .text import king_james_verses, split_point


class CharVocabulary:
    """The sorted set of characters of a text; symbol ``i`` is ``symbols[i]``."""

    def __init__(self, text: str) -> None:
        self.symbols: tuple[str, ...] = tuple(sorted(set(text)))
        self._lookup = np.full(max(map(ord, self.symbols), default=-1) + 1, -1, dtype=np.int64)
        self._lookup[[ord(c) for c in self.symbols]] = np.arange(len(self.symbols))

    @property
    def size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> np.ndarray:
        """Symbol indices (``int64``) of ``text``; raises ``ValueError`` on an unknown character."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        known = points < len(self._lookup)
        indices = np.where(known, self._lookup[np.where(known, points, 0)], -1)
        if (indices < 0).any():
            unknown = sorted({text[i] for i in np.flatnonzero(indices < 0)})
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return indices

    def decode(self, indices: Iterable[int]) -> str:
        return "".join(self.symbols[int(i)] for i in indices)


class CharLMTask:
    """Next-character prediction on the King James Bible, measured in bits per character.

    The model maps ``tokens [B, T]`` (int64) to logits ``[B, T, V]`` (like
    :class:`compressor.zoo.CharLM`).  Training batches are ``batch_size`` windows of
    ``seq_len + 1`` characters at uniformly random positions of the ``train`` split:
    ``(inputs, targets) = (window[:, :-1], window[:, 1:])``.

    :meth:`evaluate` reads the first ``eval_chars`` characters of a split (all of it when
    ``None``) and predicts each of them but the first: the text is cut into consecutive,
    non-overlapping windows of ``seq_len`` predictions (the last one shorter), and each window
    starts from a zero hidden state — as in training — so every character is predicted from
    between 1 and ``seq_len`` characters of context.  Carrying the state across windows would
    give a slightly lower bpc.
    """

    name = "charlm"
    metric = "bpc"
    higher_is_better = False

    def __init__(self, seq_len: int = 128, batch_size: int = 32, test_fraction: float = 0.1,
                 eval_chars: int | None = 200_000) -> None:
        self.seq_len, self.batch_size, self.eval_chars = seq_len, batch_size, eval_chars
        self.text = "\n".join(king_james_verses())
        self.vocab = CharVocabulary(self.text)
        codes = torch.from_numpy(self.vocab.encode(self.text))
        cut = split_point(len(codes), test_fraction)
        self.splits: dict[str, torch.Tensor] = {"train": codes[:cut], "test": codes[cut:]}
        if len(self.splits["train"]) <= seq_len:
            raise ValueError(f"seq_len={seq_len} does not fit in the {cut}-character training split")
        if eval_chars is not None and eval_chars < 2:
            raise ValueError(f"eval_chars={eval_chars}: evaluation needs at least 2 characters")

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train = self.splits["train"]
        offsets = torch.arange(self.seq_len + 1)
        while True:
            starts = torch.randint(len(train) - self.seq_len, (self.batch_size, 1), generator=generator)
            windows = train[starts + offsets]
            yield windows[:, :-1], windows[:, 1:]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}: use {' or '.join(self.splits)}")
        text = self.splits[split][: self.eval_chars]
        predicted = len(text) - 1
        full = predicted // self.seq_len
        windows = [text[: full * self.seq_len + 1].unfold(0, self.seq_len + 1, self.seq_len)] if full else []
        if predicted > full * self.seq_len:
            windows.append(text[full * self.seq_len:].unsqueeze(0))
        was_training = model.training
        model.eval()
        total = 0.0
        for group in windows:
            for batch in group.split(self.batch_size):
                logits = model(batch[:, :-1])
                total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           batch[:, 1:].reshape(-1), reduction="sum"))
        model.train(was_training)
        nats = total / predicted
        return {"bpc": bits_per_character(nats), "loss_nats": nats}
