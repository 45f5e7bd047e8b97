"""Importance criteria of Molchanov, Mallya, Tyree, Frosio and Kautz (2019), "Importance
Estimation for Neural Network Pruning" (CVPR), and the baselines they compare with.

Notation: a unit (structure) ``m`` with parameters ``S`` (for a Conv/Linear output channel: its
weight row and bias, plus γ and β of the BatchNorm right after it; for a recurrent hidden unit:
its rows ``g·H + k`` of ``weight_ih``, ``weight_hh`` and both biases, every gate ``g``), a gate
``z_m = 1`` multiplying the unit's output, ``g_s = ∂L/∂w_s`` the gradient of the minibatch loss.
Removing the unit changes the loss by ``ΔL = L(z_m = 0) − L(z_m = 1)``; the *oracle* importance is
``ΔL²`` (the paper's eq. 2; :func:`~compressor.taylor.oracle.oracle_importance`).

=====================  ==============================================  ============================
name                   importance of unit m per minibatch                paper
=====================  ==============================================  ============================
taylor_fo_gate         ``(∂L/∂z_m)²``                                    eq. 7 on gates (FO, best)
taylor_fo_weight       ``(Σ_{s∈S} g_s w_s)²`` (group contribution)       eq. 8
taylor_fo_weight_sum   ``Σ_{s∈S} (g_s w_s)²`` (sum of contributions)     eq. 6 summed over S
taylor_so_gate         ``(∂L/∂z_m − ½ ∂²L/∂z_m²)²``                      eq. 4 on the gate
magnitude              ``‖W_m‖₂`` (the producer's weights of the unit)   baseline
bn_scale               ``|γ_m|`` (the BatchNorm after the unit)          baseline (network slimming)
random                 a fixed uniform random number per unit            baseline
=====================  ==============================================  ============================

**Gates.**  A gate multiplies the structure's output (the paper's best placement: *after* the
BatchNorm; ``gate_position="before_bn"`` puts it between the Conv/Linear and its BatchNorm).
Because the output is linear in z, ``∂L/∂z_m = Σ_{s} g_s w_s`` over the parameters the gate
scales: after the BatchNorm ``∂L/∂z = γ·∂L/∂γ + β·∂L/∂β``; before it (or without one)
``∂L/∂z = Σ_row g·w + b·∂L/∂b`` — the identities the tests check.  So
``taylor_fo_weight = (∂L/∂z_before + ∂L/∂z_after)²`` and, with a BatchNorm in training mode, the
first term is about 0 (BatchNorm undoes any scale of its input).  A recurrent unit's gate
multiplies the unit's output where it leaves the layer (the module output, or the next layer's
input columns inside a multi-layer module); it does not gate the recurrent feedback — an
approximation for the criteria only, the removal itself is exact.

**Tied units** (a residual addition, a depthwise convolution, a bidirectional sum) share one
gate: its derivative is the sum of the members' (``Σ`` over members before squaring); weight
criteria sum over all members' parameters; ``magnitude`` is the norm of all members' weights;
``bn_scale`` the sum of their |γ|.  A unit with no BatchNorm gets ``bn_scale = +inf`` (never
pruned by that criterion; see the report).

**Second order.**  ``∂²L/∂z_m²`` is the diagonal element of the Hessian with respect to the
gates — for a gate on the weights it equals ``w_Sᵀ H_S w_S``, the paper's full second-order term
of the structure — estimated with Hutchinson probes ``v ∈ {±1}^units``:
``diag(H) ≈ v ⊙ (H v)`` (one Hessian-vector product per probe, a double backward through the
model; the estimate is unbiased and its noise averages out over minibatches).  It needs
:meth:`TaylorPruner.backward` in place of ``loss.backward()``.

**Averaging** (the paper, section 3.3): per-minibatch importances are smoothed with momentum
``I ← μ·I + (1 − μ)·I_batch`` (μ = 0.9; the first minibatch initializes; ``momentum=None``: the
plain mean since ``prepare``).  **Normalization** ``"l2"`` divides each unit's importance by
the L2 norm of the importances of its layer (the units over the same set of layers) before the
global ranking; the paper ranks Taylor importances globally without it.
"""

from __future__ import annotations

from typing import Literal

Criterion = Literal["taylor_fo_gate", "taylor_fo_weight", "taylor_fo_weight_sum", "taylor_so_gate", "magnitude",
                    "bn_scale", "random"]
GatePosition = Literal["after_bn", "before_bn"]

CRITERIA: tuple[str, ...] = ("taylor_fo_gate", "taylor_fo_weight", "taylor_fo_weight_sum", "taylor_so_gate",
                             "magnitude", "bn_scale", "random")
#: criteria averaged over minibatches (the others are read off the weights when ranking)
ACCUMULATED: frozenset[str] = frozenset({"taylor_fo_gate", "taylor_fo_weight", "taylor_fo_weight_sum",
                                         "taylor_so_gate"})
GATE_POSITIONS: tuple[str, ...] = ("after_bn", "before_bn")
