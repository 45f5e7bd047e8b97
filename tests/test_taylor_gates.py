"""Gates give the gradients of the weight form: ∂L/∂z = Σ g·w over the parameters the gate scales."""

import pytest
import torch
from torch import nn

from compressor.taylor import TaylorPruner

from .test_taylor_models import BiGRU, ResCNN, randomize_batchnorm


class ConvNet(nn.Module):
    """Conv (bias) → BN → ReLU → Conv (bias, no BN) → ReLU → pool → Linear → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def _prepared(model, x, **kw):
    pruner = TaylorPruner(**kw)
    pruner.prepare(model, (x,))
    return pruner


def _units_of(pruner, layer):
    """Unit indices of the units of one layer, in channel order (untied layers only)."""
    space = next(s for s in pruner.analysis.spaces if s.name == layer)
    return [int(pruner.atom_class[a]) for a in space.atoms]


def _backward(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()


def _row_contribution(*params):
    """Σ g·w per output row over parameters whose dim 0 is the unit."""
    return sum((p.grad * p).detach().reshape(p.shape[0], -1).sum(1).double() for p in params if p is not None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # model initialization


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(16, 2, 5, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def test_gate_after_bn_equals_gamma_beta_contribution(data):
    """After-BN gate: ∂L/∂z = γ·∂L/∂γ + β·∂L/∂β (training mode: batch statistics)."""
    x, y = data
    model = randomize_batchnorm(ConvNet()).train()
    pruner = _prepared(model, x)
    _backward(model, x, y)
    expected = _row_contribution(model.bn1.weight, model.bn1.bias)
    got = pruner.gate_gradients()[_units_of(pruner, "conv1")]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert expected.abs().max() > 1e-4  # not a vacuous identity


def test_gate_before_bn_equals_conv_row_and_bias_contribution(data):
    """Before-BN gate (BN in eval mode, so a scale of its input matters): ∂L/∂z = Σ_row g·w + b·∂L/∂b."""
    x, y = data
    model = randomize_batchnorm(ConvNet()).eval()
    pruner = _prepared(model, x, gate_position="before_bn")
    _backward(model, x, y)
    expected = _row_contribution(model.conv1.weight, model.conv1.bias)
    got = pruner.gate_gradients()[_units_of(pruner, "conv1")]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert expected.abs().max() > 1e-4


@pytest.mark.parametrize("layer", ["conv2", "fc1"])
def test_gate_without_bn_equals_weight_row_and_bias_contribution(data, layer):
    x, y = data
    model = randomize_batchnorm(ConvNet()).train()
    pruner = _prepared(model, x)
    _backward(model, x, y)
    module = getattr(model, layer)
    expected = _row_contribution(module.weight, module.bias)
    torch.testing.assert_close(pruner.gate_gradients()[_units_of(pruner, layer)], expected, rtol=1e-5, atol=1e-8)
    assert expected.abs().max() > 1e-4


def test_group_contribution_criterion_is_the_sum_of_both_gates(data):
    """taylor_fo_weight = (Σ over conv row, bias, γ, β of g·w)² = (∂L/∂z_before + ∂L/∂z_after)²."""
    x, y = data
    model = randomize_batchnorm(ConvNet()).eval()
    after = _prepared(model, x)
    _backward(model, x, y)
    units = _units_of(after, "conv1")
    g_after = after.gate_gradients()[units]
    g_before = _row_contribution(model.conv1.weight, model.conv1.bias)
    torch.testing.assert_close(after.batch_importance("taylor_fo_weight")[units], (g_after + g_before) ** 2,
                               rtol=1e-5, atol=1e-12)
    expected_sum = sum(((p.grad * p).detach().double() ** 2).reshape(5, -1).sum(1)
                       for p in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias))
    torch.testing.assert_close(after.batch_importance("taylor_fo_weight_sum")[units], expected_sum,
                               rtol=1e-5, atol=1e-12)


def test_tied_units_share_one_gate(data):
    """A residual addition ties stem channel k with block1.conv2 channel k: their gate derivative
    is the sum of both BN identities."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 8, 8, generator=generator), torch.randint(0, 5, (4,), generator=generator)
    model = randomize_batchnorm(ResCNN()).train()
    pruner = _prepared(model, x)
    _backward(model, x, y)
    tied = [u for u in pruner.units if u.name.startswith("stem[") and "block1.conv2" in u.name]
    assert len(tied) == 6
    expected = _row_contribution(model.bn.weight, model.bn.bias) + \
        _row_contribution(model.block1.bn2.weight, model.block1.bn2.bias)
    got = pruner.gate_gradients()[[u.index for u in tied]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_recurrent_gates_equal_consumer_column_contribution():
    """Layer-0 units of a 2-layer bidirectional GRU are gated on the next layer's input columns:
    ∂L/∂z = Σ over weight_ih_l1 (both directions) columns d·H + k of g·w; last-layer units on the
    module output: ∂L/∂z = Σ over the Linear's column of g·w."""
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, 5, generator=generator), torch.randint(0, 3, (3 * 4,), generator=generator)
    model = BiGRU()
    pruner = _prepared(model, x)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x).reshape(-1, 3), y).backward()
    gates = pruner.gate_gradients()
    rnn = model.rnn
    columns = sum((rnn.parametrizations[name].original.grad * rnn.parametrizations[name].original).sum(0)
                  for name in ("weight_ih_l1", "weight_ih_l1_reverse")).double()
    for d, layer in enumerate(("rnn.l0", "rnn.l0_reverse")):
        torch.testing.assert_close(gates[_units_of(pruner, layer)], columns[d * 6:(d + 1) * 6], rtol=1e-5, atol=1e-8)
    fc_columns = (model.fc.weight.grad * model.fc.weight).sum(0).double()
    for d, layer in enumerate(("rnn.l1", "rnn.l1_reverse")):
        torch.testing.assert_close(gates[_units_of(pruner, layer)], fc_columns[d * 6:(d + 1) * 6],
                                   rtol=1e-5, atol=1e-8)


def test_gates_do_not_change_the_model(data):
    x, _ = data
    model = randomize_batchnorm(ConvNet()).eval()
    with torch.no_grad():
        before = model(x)
    _prepared(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
