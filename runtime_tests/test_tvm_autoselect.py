"""Block-shape auto-selection on the host: every candidate is pruned, scored, compiled and timed,
and the choice is the fastest candidate within the accuracy budget."""

import torch
from torch import nn

from compressor.blocks import BlockShape
from exporters.tvm_autoselect import select_block_shape

CANDIDATES = (BlockShape(1, 1), BlockShape(16, 1), BlockShape(4, 4))


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    inputs = torch.randn(64, 128)
    with torch.no_grad():
        reference = model(inputs)

    def score(pruned: nn.Module) -> float:  # higher is better: minus the relative output error
        with torch.no_grad():
            return -float((pruned(inputs) - reference).norm() / reference.norm())

    return model, score


def test_choice_is_fastest_within_budget():
    model, score = _setup()
    wide = select_block_shape(model, (torch.randn(1, 128),), score, sparsity=0.8, budget=10.0, candidates=CANDIDATES)
    assert [t.block for t in wide.trials] == list(CANDIDATES)
    assert all(t.latency_ms > 0 and t.size_bytes > 0 for t in wide.trials)
    assert wide.chosen.latency_ms == min(t.latency_ms for t in wide.trials)  # every candidate is within budget

    strict = select_block_shape(model, (torch.randn(1, 128),), score, sparsity=0.8, budget=0.0, candidates=CANDIDATES)
    assert strict.chosen.score == max(t.score for t in strict.trials)
    # magnitude pruning element by element keeps the most of the output
    assert strict.chosen.block == BlockShape(1, 1)
