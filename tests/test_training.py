"""The training harness: resume is exact, Ctrl-C leaves a checkpoint, checkpoints are atomic."""

import pytest
import torch

from compressor import CubicSchedule, MagnitudePruner, PruneGroup, ThresholdSchedule
from compressor.selection import LINEAR_TYPES, RECURRENT_TYPES
from compressor.tasks.adding import AddingGRU, AddingProblem
from compressor.training import TrainConfig, train


def _setup():
    torch.manual_seed(0)
    model = AddingGRU(hidden=16)
    pruner = MagnitudePruner([
        PruneGroup(ThresholdSchedule(start_itr=5, ramp_itr=15, end_itr=30, freq=5), types=RECURRENT_TYPES,
                   final_sparsity=0.8),
        PruneGroup(CubicSchedule(0.7, start_itr=5, n_steps=4, delta_t=5), types=LINEAR_TYPES),
    ])
    pruner.prepare(model)
    return model, pruner


class _Interrupting(AddingProblem):
    """Raises KeyboardInterrupt when asked for the loss of batch ``at`` (like Ctrl-C mid-run)."""

    def __init__(self, at: int) -> None:
        super().__init__(length=10, batch_size=16)
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "calls", 0)

    def loss(self, model, batch):
        object.__setattr__(self, "calls", self.calls + 1)
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().loss(model, batch)


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    task = AddingProblem(length=10, batch_size=16)
    straight, straight_pruner = _setup()
    train(straight, task, TrainConfig(steps=40, lr=1e-2, seed=3), straight_pruner, progress=False)

    checkpoint = tmp_path / "run.pt"
    model, pruner = _setup()
    config = TrainConfig(steps=40, lr=1e-2, seed=3, checkpoint=checkpoint, checkpoint_every=7)
    with pytest.raises(KeyboardInterrupt):
        train(model, _Interrupting(at=23), config, pruner, progress=False)
    assert torch.load(checkpoint, weights_only=True)["step"] == 22
    assert not (tmp_path / "run.pt.tmp").exists()

    model, pruner = _setup()  # a fresh process would rebuild both, then resume from the file
    result = train(model, task, config, pruner, progress=False)
    assert result.resumed_from == 22 and result.steps == 40
    assert pruner.state_dict() == straight_pruner.state_dict()
    a, b = straight.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(r.pruned for r in pruner.report()) > 0


def test_cosine_learning_rate_and_gradient_clipping_run():
    from compressor.training import _lr_at

    config = TrainConfig(steps=100, lr=1.0, cosine=True, final_lr_fraction=0.1)
    assert _lr_at(config, 0) == pytest.approx(1.0)
    assert _lr_at(config, 50) == pytest.approx(0.1 + 0.45)
    assert _lr_at(config, 100) == pytest.approx(0.1)
    model = AddingGRU(hidden=8)
    result = train(model, AddingProblem(length=8, batch_size=8), TrainConfig(steps=5, grad_clip=0.1), progress=False)
    assert len(result.losses) == 5 and not model.training
