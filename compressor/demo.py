"""The main job while the rest of the pipeline is being built: train a GRU on the adding
problem, then prune it to a target sparsity while training on — gradually with the schedule of
Narang et al. (2017) or the cubic one, and one-shot ("hard") for comparison, each from the same
dense weights — report per-layer sparsity and the error on a held-out split, then pack the
Narang-pruned model (fp32 and int8), report its size and run it through the sparse reference
modules."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .packed_model import PackingConfig, pack_model
from .pruner import MagnitudePruner, PruneGroup
from .quantize import QuantError, format_quant_errors
from .report import LayerSparsity, format_report, sparsity_report
from .schedules import CubicSchedule, OneShot, PruningSchedule, ThresholdSchedule
from .selection import LINEAR_TYPES, RECURRENT_TYPES
from .size import SizeReport, format_bytes, format_size_report
from .sparse_modules import swap_sparse_modules
from .training import TrainConfig, train
from .tasks.adding import BASELINE_MSE, AddingGRU, AddingProblem, mean_squared_error


PACKED_FROM = "gradual, threshold (Narang)"


@dataclass(frozen=True)
class DemoResult:
    sparsity: float
    dense_mse: float
    mse: dict[str, float]
    reports: dict[str, list[LayerSparsity]]
    sizes: dict[str, SizeReport]
    packed_mse: dict[str, float]
    quant_errors: list[QuantError]


def paper_groups(schedule: PruningSchedule, final_sparsity: float | None) -> list[PruneGroup]:
    """One group for recurrent and one for fully connected layers, as in Narang et al. (2017).
    The 2-channel input weight and the 1-unit output layer are left dense."""
    return [
        PruneGroup(schedule, types=RECURRENT_TYPES, exclude=r"weight_ih_l0", final_sparsity=final_sparsity, name="recurrent"),
        PruneGroup(schedule, types=LINEAR_TYPES, exclude=r"^out\.", final_sparsity=final_sparsity,
                   name="linear"),
    ]


def run_pruning_demo(sparsity: float = 0.9, dense_steps: int = 1500, prune_steps: int = 1500, hidden: int = 128,
                     seed: int = 0, progress: bool = True) -> DemoResult:
    """Train dense, then prune copies of the dense model with three schedules while training on."""
    torch.manual_seed(seed)
    task = AddingProblem()
    eval_data = task.eval_set()
    dense = AddingGRU(hidden)
    train(dense, task, TrainConfig(dense_steps, lr=2e-3, seed=seed), progress=progress, desc="dense training")

    end = int(prune_steps * 0.75)
    schedules: dict[str, tuple[PruningSchedule, float | None]] = {
        "gradual, threshold (Narang)": (ThresholdSchedule(start_itr=0, ramp_itr=end // 2, end_itr=end, freq=10),
                                        sparsity),
        "gradual, cubic (Zhu & Gupta)": (CubicSchedule(sparsity, start_itr=10, n_steps=end // 10 - 1, delta_t=10),
                                         None),
        "one-shot (hard)": (OneShot(sparsity), None),
    }
    mse, reports = {}, {}
    for label, (schedule, final_sparsity) in schedules.items():
        model = copy.deepcopy(dense)
        pruner = MagnitudePruner(paper_groups(schedule, final_sparsity))
        pruner.prepare(model)
        train(model, task, TrainConfig(prune_steps, lr=2e-3, seed=seed + 1), pruner, progress=progress, desc=label)
        model = pruner.finalize()
        mse[label] = mean_squared_error(model, eval_data)
        reports[label] = sparsity_report(model)
        if label == PACKED_FROM:
            sizes, packed_mse, quant_errors = pack_and_check(model, eval_data)
    return DemoResult(sparsity, mean_squared_error(dense, eval_data), mse, reports, sizes, packed_mse, quant_errors)


def pack_and_check(model: nn.Module, eval_data: tuple[torch.Tensor, torch.Tensor]):
    """Pack fp32 and int8 (format and block chosen by size) and evaluate the sparse reference
    modules: fp32, int8 weight-only and int8 with dynamic int8 activations."""
    fp32 = pack_model(model, PackingConfig())
    int8 = pack_model(model, PackingConfig(dtype="int8"))
    sizes = {"fp32": fp32.size_report(), "int8": int8.size_report()}
    packed_mse = {
        "packed fp32": mean_squared_error(swap_sparse_modules(fp32), eval_data),
        "packed int8, weight-only": mean_squared_error(swap_sparse_modules(int8), eval_data),
        "packed int8, int8 activations": mean_squared_error(swap_sparse_modules(int8, "int8"), eval_data),
    }
    return sizes, packed_mse, int8.quant_errors()


def format_demo(result: DemoResult) -> str:
    """Per-layer tables, the error of each schedule, and the packed sizes, as text."""
    lines = []
    for label, rows in result.reports.items():
        lines += [f"Per-layer sparsity, {label}:", format_report(rows), ""]
    lines += [f"Packed int8 ({PACKED_FROM}; format and block per layer chosen by size):",
              format_size_report(result.sizes["int8"]), "", "int8 weight error (symmetric, per output channel):",
              format_quant_errors(result.quant_errors), ""]
    lines.append(f"Adding problem, held-out mean squared error (predicting the mean gives {BASELINE_MSE:.3f}); "
                 f"requested sparsity {result.sparsity:.0%} of the pruned layers:")
    lines.append(f"  {'dense':32s} {result.dense_mse:.5f}")
    for label, value in result.mse.items():
        pruned = sum(r.pruned for r in result.reports[label])
        total = sum(r.total for r in result.reports[label] if r.pruned)
        lines.append(f"  {label:32s} {value:.5f}   (pruned layers at {pruned / total:.1%})")
    dense_bytes = result.sizes["fp32"].dense_fp32_bytes
    lines.append(f"  {'(fp32 dense size)':32s} {'':7s}   {format_bytes(dense_bytes)}")
    for label, value in result.packed_mse.items():
        size = result.sizes["int8" if "int8" in label else "fp32"]
        lines.append(f"  {label:32s} {value:.5f}   {format_bytes(size.total_bytes)}, {size.compression:.1f}x smaller")
    return "\n".join(lines)
