"""Metrics: CTC greedy decoding, character and word error rates, bits per character."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .text import BLANK, decode


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, 1):
        current = [i]
        for j, hyp_item in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)))
        previous = current
    return previous[-1]


def error_rate(references: Sequence[Sequence], hypotheses: Sequence[Sequence]) -> float:
    """Σ edit distance / Σ reference length (CER on strings, WER on word lists)."""
    errors = sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True))
    total = sum(len(r) for r in references)
    return errors / total if total else 0.0


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Best path: arg-max per frame, repeats merged, blanks removed.  ``log_probs``: ``[batch, time, classes]``."""
    best = log_probs.argmax(dim=-1)
    texts = []
    for row, length in zip(best, lengths.tolist()):
        path = row[:length].tolist()
        texts.append(decode(c for i, c in enumerate(path) if c != BLANK and (i == 0 or c != path[i - 1])))
    return texts


def bits_per_character(mean_nats: float) -> float:
    """Cross-entropy in nats per character → bits per character."""
    return mean_nats / math.log(2)
