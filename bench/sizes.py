"""Size of the paper-size Deep Speech 2 model in every storage format at 80 / 90 / 95 % sparsity.

    python -m bench.sizes [--out bench/results] [--sparsity 0.8 0.9 0.95]

The model is ``build_model("ds2")`` (67.7 M parameters, 270.8 MB fp32; Narang et al. 2017
report 268 MB dense and ~32 MB at ~90 % sparsity).  Every Linear weight (recurrent input and
hidden-to-hidden, FC, output) is magnitude-pruned one-shot to the sparsity — element-wise for
CSR / COO / bit-mask, in blocks for BSR — and packed; the two convolutions (0.25 M parameters)
stay dense fp32.  Sizes come from :func:`compressor.size.size_report`: bytes of the stored
arrays.  Size depends only on the sparsity pattern and the dtypes, not on trained values, so a
freshly initialized model gives the same numbers as a trained one with the same pattern.
Writes ``sizes.json``, ``sizes.md`` and ``sizes.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from compressor import BlockShape, MagnitudePruner, OneShot, PruneGroup
from compressor.packed_model import PackingConfig, pack_model
from compressor.selection import LINEAR_TYPES
from compressor.size import SizeReport, format_bytes
from compressor.zoo import build_model

PAPER_DENSE_MB = 268.0
PAPER_SPARSE_MB = 32.0
GOAL_BLOCK_INT8_MB = 12.0

def _linear(**kwargs) -> PackingConfig:
    """Pack the Linear weights only: the convolutions stay dense fp32 (counted as other tensors)."""
    return PackingConfig(types=LINEAR_TYPES, **kwargs)


# (label, pruning block, packing config); packing follows the pruning pattern
VARIANTS: list[tuple[str, BlockShape, PackingConfig]] = [
    ("masked dense fp32", BlockShape(1, 1), _linear(format="dense")),
    ("CSR fp32", BlockShape(1, 1), _linear(format="csr")),
    ("CSR int8", BlockShape(1, 1), _linear(format="csr", dtype="int8")),
    ("bit-mask fp32", BlockShape(1, 1), _linear(format="bitmask")),
    ("bit-mask int8", BlockShape(1, 1), _linear(format="bitmask", dtype="int8")),
    ("BSR 16x1 fp32", BlockShape(16, 1), _linear(format="bsr", block=BlockShape(16, 1))),
    ("BSR 16x1 int8", BlockShape(16, 1), _linear(format="bsr", block=BlockShape(16, 1), dtype="int8")),
    ("BSR 4x4 fp32", BlockShape(4, 4), _linear(format="bsr", block=BlockShape(4, 4))),
    ("BSR 4x4 int8", BlockShape(4, 4), _linear(format="bsr", block=BlockShape(4, 4), dtype="int8")),
]


def pruned_copy(model: torch.nn.Module, sparsity: float, block: BlockShape) -> torch.nn.Module:
    pruned = copy.deepcopy(model)
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity), types=LINEAR_TYPES, block=block)])
    pruner.prepare(pruned)
    pruner.step()
    return pruner.finalize()


def measure(sparsities: list[float], model_name: str = "ds2", seed: int = 0, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    model = build_model(model_name).eval()
    params = sum(p.numel() for p in model.parameters())
    dense = pack_model(model, PackingConfig(format="dense")).size_report()
    rows: dict[str, dict[str, dict]] = {}
    with tqdm(total=len(sparsities) * len(VARIANTS), desc="pack", disable=not progress) as bar:
        for sparsity in sparsities:
            pruned_by_block: dict[BlockShape, torch.nn.Module] = {}
            for label, block, config in VARIANTS:
                if block not in pruned_by_block:
                    pruned_by_block[block] = pruned_copy(model, sparsity, block)
                report: SizeReport = pack_model(pruned_by_block[block], config).size_report()
                rows.setdefault(label, {})[f"{sparsity:g}"] = {
                    "total_bytes": report.total_bytes,
                    "packed_bytes": report.packed_bytes,
                    "other_bytes": report.other_bytes,
                    "compression": report.compression,
                }
                bar.update()
    return {
        "model": model_name,
        "parameters": params,
        "dense_fp32_bytes": dense.total_bytes,
        "sparsities": [f"{s:g}" for s in sparsities],
        "variants": rows,
        "paper": {"dense_MB": PAPER_DENSE_MB, "sparse_MB_at_about_90pct": PAPER_SPARSE_MB},
        "goal": {"block_sparse_int8_MB_at_90pct": GOAL_BLOCK_INT8_MB},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def to_markdown(result: dict) -> str:
    sparsities = result["sparsities"]
    lines = [
        "# Deep Speech 2 size by storage format",
        "",
        f"Model `{result['model']}`: {result['parameters']:,} parameters, fp32 dense "
        f"{format_bytes(result['dense_fp32_bytes'])} (paper: {PAPER_DENSE_MB:.0f} MB). All Linear weights pruned "
        "one-shot by magnitude (element-wise, or in the BSR block); convolutions dense fp32. "
        "Bytes of stored arrays, from `compressor.size.size_report`; regenerate with `python -m bench.sizes`.",
        "",
        "| format | " + " | ".join(f"{float(s):.0%} sparse" for s in sparsities) + " |",
        "| --- | " + " | ".join("---" for _ in sparsities) + " |",
        "| fp32 dense (unpruned) | " + " | ".join(format_bytes(result["dense_fp32_bytes"]) for _ in sparsities) + " |",
    ]
    for label, by_sparsity in result["variants"].items():
        cells = [f"{format_bytes(by_sparsity[s]['total_bytes'])} ({by_sparsity[s]['compression']:.1f}x)"
                 for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Paper (Narang et al. 2017, its own column): {PAPER_DENSE_MB:.0f} MB dense → ~{PAPER_SPARSE_MB:.0f} MB "
              f"at ~90 % sparsity. Goal here: ≤ {GOAL_BLOCK_INT8_MB:.0f} MB for block-sparse int8 at 90 %."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsity = "0.9" if "0.9" in result["sparsities"] else result["sparsities"][0]
    labels = ["fp32 dense"] + list(result["variants"])
    values = [result["dense_fp32_bytes"] / 1e6] + [v[sparsity]["total_bytes"] / 1e6 for v in result["variants"].values()]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.barh(labels[::-1], values[::-1], color="tab:blue")
    ax.axvline(PAPER_SPARSE_MB, color="tab:red", linestyle="--", label=f"paper, ~90 % sparse ({PAPER_SPARSE_MB:.0f} MB)")
    ax.axvline(GOAL_BLOCK_INT8_MB, color="tab:green", linestyle=":", label=f"goal, block int8 ({GOAL_BLOCK_INT8_MB:.0f} MB)")
    ax.bar_label(bars, fmt="%.1f MB", padding=3, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("stored size (MB, log scale)")
    ax.set_title(f"Deep Speech 2 ({result['parameters'] / 1e6:.1f} M parameters) at {float(sparsity):.0%} sparsity")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--model", default="ds2", help="zoo model (default: the paper-size ds2)")
    args = parser.parse_args()
    result = measure(args.sparsity, args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sizes.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    (args.out / "sizes.md").write_text(markdown)
    plot(result, args.out / "sizes.png")
    print(markdown)


if __name__ == "__main__":
    main()
