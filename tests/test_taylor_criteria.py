"""Criteria: a dead unit is ranked least important, averaging, normalization, second order, the
oracle and its rank correlation with Taylor FO on a trained network."""

import numpy as np
import pytest
import torch
from torch import nn

from compressor.taylor import (
    CRITERIA,
    TaylorPruner,
    criterion_scores,
    oracle_importance,
    oracle_scores,
    rank_correlation,
)

from .test_taylor_models import randomize_batchnorm, trained_digits_copy


@pytest.fixture
def trained_digits():
    return trained_digits_copy()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.nn.functional.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        x = torch.nn.functional.leaky_relu(self.bn2(self.conv2(x)), 0.1)
        return self.fc(x.mean((2, 3)))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _batches(n=4, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=generator), torch.randint(0, 4, (size,), generator=generator))
            for _ in range(n)]


def _dead_net():
    torch.manual_seed(0)
    model = randomize_batchnorm(Net())
    with torch.no_grad():  # channel 2 of conv1 contributes nothing: zero filter, bias, γ and β
        model.conv1.weight[2] = 0
        model.conv1.bias[2] = 0
        model.bn1.weight[2] = 0
        model.bn1.bias[2] = 0
    return model


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c != "random"])
def test_a_dead_unit_is_ranked_least_important_and_pruned_first(criterion):
    model = _dead_net().train()
    batches = _batches()
    pruner = TaylorPruner(criterion, momentum=None)
    pruner.prepare(model, (batches[0][0],))
    for batch in batches:
        model.zero_grad(set_to_none=True)
        pruner.backward(_loss(model, batch))
        pruner.accumulate()
    dead = next(u for u in pruner.units if u.name == "conv1[2]")
    scores = pruner.importance()
    others = [float(scores[u.index]) for u in pruner.units if u is not dead]
    assert float(scores[dead.index]) == 0.0 < min(others)
    assert pruner.prune(1) == ["conv1[2]"]


def test_the_oracle_of_a_dead_unit_is_zero():
    model = _dead_net().eval()
    batches = _batches(2)
    pruner = TaylorPruner()
    pruner.prepare(model, (batches[0][0],))
    deltas = oracle_importance(pruner, _loss, batches)
    dead = [u.index for u in pruner.units].index(next(u.index for u in pruner.units if u.name == "conv1[2]"))
    assert deltas.shape == (2, len(pruner.units))
    assert torch.all(deltas[:, dead] == 0) and torch.count_nonzero(deltas) == deltas.numel() - 2
    assert pruner.keep_units().all()  # masks restored


def test_momentum_and_plain_mean():
    model = _dead_net().train()
    batches = _batches(2)
    per_batch = []
    for momentum in (0.9, None, "record"):
        pruner = TaylorPruner(momentum=0.9 if momentum == "record" else momentum)
        pruner.prepare(model if momentum == 0.9 else _dead_net().train(), (batches[0][0],))
        for batch in batches:
            pruner._model.zero_grad(set_to_none=True)
            pruner.backward(_loss(pruner._model, batch))
            if momentum == "record":
                per_batch.append(pruner.batch_importance())
            pruner.accumulate()
        if momentum == 0.9:
            ema = pruner.importance(normalized=False)
        elif momentum is None:
            mean = pruner.importance(normalized=False)
    torch.testing.assert_close(ema[1:], (0.9 * per_batch[0] + 0.1 * per_batch[1])[1:])
    torch.testing.assert_close(mean[1:], ((per_batch[0] + per_batch[1]) / 2)[1:])


def test_l2_normalization_per_layer():
    model = _dead_net().train()
    pruner = TaylorPruner("magnitude", normalize="l2")
    pruner.prepare(model, (_batches(1)[0][0],))
    scores = pruner.importance()
    for layer in ("conv1", "conv2"):
        members = [u.index for u in pruner.units if u.name.startswith(layer + "[")]
        assert float(scores[members].norm()) == pytest.approx(1.0)


def test_random_is_reproducible():
    rankings = []
    for seed in (0, 0, 1):
        pruner = TaylorPruner("random", seed=seed)
        pruner.prepare(_dead_net(), (_batches(1)[0][0],))
        rankings.append(pruner.prune(5))
    assert rankings[0] == rankings[1] != rankings[2]


def test_second_order_uses_an_unbiased_diagonal_hessian_estimate():
    """Hutchinson probes average to the exact diagonal of the gate Hessian; the criterion is
    (∂L/∂z − ½ ∂²L/∂z²)²."""
    torch.manual_seed(0)
    model = randomize_batchnorm(Net()).eval()
    batch = _batches(1)[0]
    pruner = TaylorPruner("taylor_so_gate", hessian_probes=600)
    pruner.prepare(model, (batch[0],))
    pruner.backward(_loss(model, batch))
    estimate = pruner._hessian.clone()
    torch.testing.assert_close(pruner.batch_importance(),
                               (pruner.gate_gradients() - 0.5 * estimate) ** 2)
    gate = pruner._state.gate(torch.device("cpu"))
    gate.grad = None
    grad, = torch.autograd.grad(_loss(model, batch), gate, create_graph=True)
    exact = torch.stack([torch.autograd.grad(grad[i], gate, retain_graph=True)[0][i] for i in range(len(gate))])
    exact[0] = 0
    scale = float(exact.abs().max())
    assert scale > 0
    assert float((estimate - exact.double()).abs().max()) < 0.2 * scale


def test_rank_correlation_matches_a_numpy_spearman():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = a + rng.normal(size=50) * 0.5
    b[:5] = b[5]  # ties
    from compressor.taylor import oracle as oracle_module

    ra, rb = oracle_module._ranks(a), oracle_module._ranks(b)
    numpy_rho = np.corrcoef(ra, rb)[0, 1]
    assert rank_correlation(a, b) == pytest.approx(numpy_rho, abs=1e-12)
    assert rank_correlation(a, a) == pytest.approx(1.0)


def test_taylor_first_order_tracks_the_oracle_on_a_trained_network(trained_digits):
    """A trained CNN on scikit-learn's digits: Spearman correlation of Taylor FO (gate after BN)
    with the squared oracle over every channel, and higher than weight magnitude's."""
    model, task = trained_digits
    model = model.eval()
    batches = [(task.images["train"][i:i + 256], task.labels["train"][i:i + 256]) for i in range(0, 1024, 256)]
    pruner = TaylorPruner()
    pruner.prepare(model, (batches[0][0][:4],))
    scores = criterion_scores(pruner, _loss, batches, ["taylor_fo_gate", "magnitude"])
    oracle = oracle_scores(oracle_importance(pruner, _loss, batches))["squared"]
    index = [u.index for u in pruner.units]
    fo = rank_correlation(scores["taylor_fo_gate"][index], oracle)
    magnitude = rank_correlation(scores["magnitude"][index], oracle)
    assert fo > 0.8 and fo > magnitude


@pytest.mark.slow
def test_taylor_first_order_tracks_the_oracle_on_the_shipped_resnet8():
    """The shipped ResNet-8 on Fashion-MNIST, all 224 prunable channel groups, 4 minibatches of
    128 (about a minute): Taylor FO after BN > 0.8, weight magnitude far below."""
    from compressor.tasks.images import ImageTask
    from compressor.zoo.pretrained import load_pretrained

    task = ImageTask("fashion-mnist")
    model = load_pretrained("resnet8-fashion-mnist")
    batches = [(task.images["train"][i:i + 128], task.labels["train"][i:i + 128]) for i in range(0, 512, 128)]
    pruner = TaylorPruner()
    pruner.prepare(model, (batches[0][0][:2],))
    scores = criterion_scores(pruner, _loss, batches, ["taylor_fo_gate", "magnitude"])
    oracle = oracle_scores(oracle_importance(pruner, _loss, batches))["squared"]
    index = [u.index for u in pruner.units]
    assert len(index) == 224
    fo = rank_correlation(scores["taylor_fo_gate"][index], oracle)
    assert fo > 0.8 and rank_correlation(scores["magnitude"][index], oracle) < fo - 0.3
