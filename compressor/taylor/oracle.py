"""The oracle — the real change of the loss when a unit is removed — and criterion scores on the
same minibatches, for validating criteria (Molchanov et al. 2019, section 4.1).

``oracle_importance`` removes one unit at a time (its mask to 0; tied units together) and
evaluates the loss on every minibatch: ``ΔL[b, m] = L_b(without m) − L_b``.  The paper's oracle
importance is the squared change, averaged here over minibatches like the criteria:
``mean_b ΔL[b, m]²`` (:func:`oracle_scores`, key ``"squared"``; ``"signed"`` is ``mean_b ΔL``).
One forward per unit per minibatch: hundreds of units × a few batches is minutes on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def oracle_importance(pruner, loss_fn: LossFn, batches: Sequence[Any], units: Iterable[int] | None = None,
                      progress: bool = False) -> torch.Tensor:
    """``ΔL [n_batches, n_units]`` for ``units`` (unit indices; default every kept unit, in order),
    with the model in whatever mode it is in (use eval mode for a deterministic oracle)."""
    model = pruner._require_prepared()
    keep = pruner.keep_units()
    units = list(units) if units is not None else [u.index for u in pruner.units if keep[u.index]]
    deltas = torch.zeros(len(batches), len(units), dtype=torch.float64)
    iterator = units
    if progress:
        from tqdm import tqdm

        iterator = tqdm(units, desc="oracle", leave=False)
    try:
        with torch.no_grad():
            base = [float(loss_fn(model, batch)) for batch in batches]
            for column, index in enumerate(iterator):
                trial = keep.copy()
                trial[index] = False
                pruner._set_keep(trial)
                for row, batch in enumerate(batches):
                    deltas[row, column] = float(loss_fn(model, batch)) - base[row]
    finally:
        pruner._set_keep(keep)
    return deltas


def oracle_scores(deltas: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"squared": mean_b ΔL², "signed": mean_b ΔL}`` per unit."""
    return {"squared": (deltas ** 2).mean(0), "signed": deltas.mean(0)}


def criterion_scores(pruner, loss_fn: LossFn, batches: Sequence[Any], criteria: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every criterion in ``criteria`` on the same minibatches (plain mean over them), one
    backward per minibatch (``taylor_so_gate`` adds its Hessian-vector products).  Returns
    ``{criterion: scores per unit index}`` (entry 0 unused); parameter gradients are cleared."""
    model = pruner._require_prepared()
    sums: dict[str, torch.Tensor] = {}
    saved = pruner.criterion
    pruner.criterion = "taylor_so_gate" if "taylor_so_gate" in criteria else "taylor_fo_gate"
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            pruner.backward(loss_fn(model, batch))
            for name in criteria:
                if name in ("magnitude", "bn_scale", "random"):
                    continue
                value = pruner.batch_importance(name)
                sums[name] = sums.get(name, 0) + value
            pruner._gate_grad()
            pruner._hessian = None
    finally:
        pruner.criterion = saved
        model.zero_grad(set_to_none=True)
    scores = {name: value / len(batches) for name, value in sums.items()}
    for name in criteria:
        if name in ("magnitude", "bn_scale", "random"):
            scores[name] = pruner.weight_importance(name)
    return scores


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):  # average ranks over ties
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end - 1) / 2.0
            start = end
    return ranks


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr`` when installed, else average ranks +
    Pearson with numpy)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    try:
        from scipy.stats import spearmanr
    except ImportError:
        ra, rb = _ranks(a), _ranks(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
        return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")
    return float(spearmanr(a, b).statistic)
