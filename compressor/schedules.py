"""Pruning schedules: *when* masks are updated and *how much* is pruned at each update.

A schedule is a pure function of the iteration counter, so a run that is saved and resumed
follows exactly the same curve.  Two kinds of target exist:

* :class:`ThresholdSchedule` returns a magnitude **threshold** (Narang et al. 2017): every
  weight (or block) whose score is below it is pruned.
* :class:`CubicSchedule` and :class:`OneShot` return a **sparsity** in [0, 1): the pruner
  removes exactly that fraction of weights (or blocks).

``itr`` counts completed optimizer steps: the pruner calls the schedule with 1 after the first
``optimizer.step()``, 2 after the second, and so on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

TargetKind = Literal["threshold", "sparsity"]


@runtime_checkable
class PruningSchedule(Protocol):
    """What the pruner needs from a schedule."""

    kind: TargetKind

    def is_update_step(self, itr: int) -> bool:
        """True if masks are recomputed at iteration ``itr``."""

    def target(self, itr: int, q: float = 1.0) -> float:
        """The threshold (``kind == "threshold"``) or sparsity (``kind == "sparsity"``) at ``itr``.

        ``q`` scales threshold schedules (it is ignored by sparsity schedules).
        """


def _check_sparsity(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1): a sparsity is a fraction below 1")


@dataclass(frozen=True)
class ThresholdSchedule:
    r"""Gradual magnitude pruning of Narang, Elsen, Diamos and Sengupta (2017),
    "Exploring Sparsity in Recurrent Neural Networks", ICLR 2017, Algorithm 1 and Table 1.

    Masks are updated when ``start_itr < itr < end_itr`` and ``itr % freq == 0``.  The
    threshold rises monotonically::

        ε(itr) = θ·(itr − start_itr + 1) / freq                                  itr <  ramp_itr
        ε(itr) = (θ·(ramp_itr − start_itr + 1) + φ·(itr − ramp_itr + 1)) / freq   itr >= ramp_itr

    with ``θ = 2·q·freq / (2·(ramp_itr − start_itr) + 3·(end_itr − ramp_itr))`` and
    ``φ = phi_ratio·θ`` (the paper: ``φ = 1.5·θ``), where ``q`` is the 90th percentile of
    ``|w|`` of the trained dense layer.  Weights with ``|w| < ε`` are zeroed and stay zero.

    ``q`` is per tensor (or per group with global ranking) and is given to :meth:`target`;
    :func:`q_for_final_sparsity` picks it so that a requested sparsity is reached.
    """

    start_itr: int
    ramp_itr: int
    end_itr: int
    freq: int = 100
    phi_ratio: float = 1.5
    kind: TargetKind = "threshold"

    def __post_init__(self) -> None:
        if not 0 <= self.start_itr <= self.ramp_itr <= self.end_itr:
            raise ValueError(
                "ThresholdSchedule needs 0 <= start_itr <= ramp_itr <= end_itr, got "
                f"{self.start_itr}, {self.ramp_itr}, {self.end_itr}"
            )
        if self.freq < 1:
            raise ValueError(f"freq must be >= 1, got {self.freq}")
        if self.last_update_itr() is None:
            raise ValueError(
                f"ThresholdSchedule(start_itr={self.start_itr}, end_itr={self.end_itr}, "
                f"freq={self.freq}) never updates a mask: make end_itr - start_itr larger than freq"
            )

    def theta(self, q: float = 1.0) -> float:
        """θ = 2·q·freq / (2·(ramp_itr − start_itr) + 3·(end_itr − ramp_itr))."""
        denom = 2 * (self.ramp_itr - self.start_itr) + 3 * (self.end_itr - self.ramp_itr)
        return 2.0 * q * self.freq / denom

    def phi(self, q: float = 1.0) -> float:
        """φ = phi_ratio·θ (1.5·θ in the paper)."""
        return self.phi_ratio * self.theta(q)

    def is_update_step(self, itr: int) -> bool:
        return self.start_itr < itr < self.end_itr and itr % self.freq == 0

    def target(self, itr: int, q: float = 1.0) -> float:
        theta, phi = self.theta(q), self.phi(q)
        if itr < self.ramp_itr:
            return theta * (itr - self.start_itr + 1) / self.freq
        return (theta * (self.ramp_itr - self.start_itr + 1) + phi * (itr - self.ramp_itr + 1)) / self.freq

    def last_update_itr(self) -> int | None:
        """The last iteration at which masks change (the largest multiple of freq below end_itr)."""
        last = (self.end_itr - 1) // self.freq * self.freq
        return last if last > self.start_itr else None


def q_for_final_sparsity(schedule: ThresholdSchedule, final_threshold: float) -> float:
    """The ``q`` for which the schedule's threshold at its last update equals ``final_threshold``.

    The threshold is linear in ``q``, so ``q = final_threshold / ε_{q=1}(last_update_itr)``.
    Pass as ``final_threshold`` the score below which the requested fraction of weights lies
    (see :func:`compressor.pruner.quantile_threshold`): on fixed weights the schedule then ends
    at exactly that sparsity.
    """
    last = schedule.last_update_itr()
    assert last is not None  # checked in __post_init__
    return final_threshold / schedule.target(last, q=1.0)


@dataclass(frozen=True)
class CubicSchedule:
    r"""Automated gradual pruning of Zhu and Gupta (2017), "To prune, or not to prune":

        s_t = s_f + (s_i − s_f)·(1 − (t − t_0)/(n·Δt))³      for t_0 <= t <= t_0 + n·Δt

    applied every Δt steps (``t − t_0`` a multiple of Δt).  It is the curve of TensorFlow Model
    Optimization's ``PolynomialDecay(power=3)`` with ``begin_step = t_0`` and
    ``end_step = t_0 + n·Δt``, and of ``torch.ao.pruning``'s ``CubicSL``.
    """

    final_sparsity: float
    start_itr: int
    n_steps: int
    delta_t: int = 100
    initial_sparsity: float = 0.0
    kind: TargetKind = "sparsity"

    def __post_init__(self) -> None:
        _check_sparsity("final_sparsity", self.final_sparsity)
        _check_sparsity("initial_sparsity", self.initial_sparsity)
        if self.n_steps < 1 or self.delta_t < 1 or self.start_itr < 0:
            raise ValueError("CubicSchedule needs n_steps >= 1, delta_t >= 1 and start_itr >= 0")

    @property
    def end_itr(self) -> int:
        return self.start_itr + self.n_steps * self.delta_t

    def is_update_step(self, itr: int) -> bool:
        return self.start_itr <= itr <= self.end_itr and (itr - self.start_itr) % self.delta_t == 0

    def target(self, itr: int, q: float = 1.0) -> float:
        progress = min(1.0, max(0.0, (itr - self.start_itr) / (self.n_steps * self.delta_t)))
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class OneShot:
    """"Hard pruning", the baseline of Narang et al. (2017): prune to ``sparsity`` at ``at_itr``
    in one step (magnitude ranking), then train on with the mask fixed.

    ``at_itr=1`` (the default) prunes at the first ``pruner.step()``: for one-shot pruning of a
    trained model without any training, call ``step()`` once.
    """

    sparsity: float
    at_itr: int = 1
    kind: TargetKind = "sparsity"

    def __post_init__(self) -> None:
        _check_sparsity("sparsity", self.sparsity)

    def is_update_step(self, itr: int) -> bool:
        return itr == self.at_itr

    def target(self, itr: int, q: float = 1.0) -> float:
        return self.sparsity


def count_to_prune(sparsity: float, total: int) -> int:
    """Number of items to remove for a sparsity: ``round(sparsity·total)`` (half away from zero)."""
    return min(total, int(math.floor(sparsity * total + 0.5)))
