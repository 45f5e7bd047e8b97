"""The shrunk model is plain, smaller, dense and computes what the masked (gated) model computes."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor.taylor import MASK_BUFFER, PrunedRNN, TaylorPruner, max_relative_difference
from compressor.zoo import build_model

from .test_taylor_models import Awkward, BiGRU, Ops, ResCNN, SummedGRU, UntraceableRoot, randomize_batchnorm

CASES = {
    "rescnn": (ResCNN, lambda g, b: torch.randn(b, 1, 8, 8, generator=g)),
    "resnet8-w4": (lambda: build_model("resnet8", width=4), lambda g, b: torch.randn(b, 1, 28, 28, generator=g)),
    "bigru": (BiGRU, lambda g, b: torch.randn(b, 7, 5, generator=g)),
    "bilstm": (lambda: BiGRU(nn.LSTM), lambda g, b: torch.randn(b, 7, 5, generator=g)),
    "birnn-relu": (lambda: BiGRU(nn.RNN, nonlinearity="relu"), lambda g, b: torch.randn(b, 7, 5, generator=g)),
    "summed-gru": (SummedGRU, lambda g, b: torch.randn(7, b, 5, generator=g)),
    "ds2-mini-h16": (lambda: build_model("ds2-mini", hidden=16), lambda g, b: torch.randn(b, 1, 64, 12, generator=g)),
    "ds2-shared-input": (lambda: build_model("ds2", n_freq=32, hidden=16, layers=2),  # untraceable recurrent layers
                         lambda g, b: torch.randn(b, 1, 32, 12, generator=g)),
    "charlm-lstm": (lambda: build_model("charlm", hidden=12, layers=2, cell="lstm"),
                    lambda g, b: torch.randint(0, 63, (b, 6), generator=g)),
    "awkward": (Awkward, lambda g, b: torch.randn(b, 5, 4, generator=g)),
    "ops": (Ops, lambda g, b: torch.randn(b, 1, 6, 6, generator=g)),
    "untraceable-root": (UntraceableRoot, lambda g, b: torch.randn(b, 1, 6, 6, generator=g)),
}


def _pruned(name: str, fraction: float, seed: int):
    torch.manual_seed(seed)
    factory, inputs = CASES[name]
    generator = torch.Generator().manual_seed(seed)
    model = randomize_batchnorm(factory(), generator).eval()
    pruner = TaylorPruner("random", seed=seed)
    pruner.prepare(model, (inputs(generator, 3),))
    pruner.prune(int(len(pruner.units) * fraction))
    return model, pruner, inputs


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_shrunk_output_equals_masked_output(name, seed):
    model, pruner, inputs = _pruned(name, 0.6, seed)
    small = pruner.shrink()  # verifies on the example inputs itself; check another batch size too
    other = (inputs(torch.Generator().manual_seed(99), 5),)
    assert max_relative_difference(model, small, other) < 1e-5
    assert sum(p.numel() for p in small.parameters()) == pruner.remaining()["params"] < pruner.dense["params"]


@pytest.mark.parametrize("name", ["rescnn", "bigru", "summed-gru"])
def test_shrunk_model_is_plain_and_dense(name):
    model, pruner, _inputs = _pruned(name, 0.5, 0)
    small = pruner.shrink()
    assert not any(parametrize.is_parametrized(m) for m in small.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in small.modules())
    assert MASK_BUFFER not in small.state_dict()
    assert all(p.is_contiguous() and p.layout == torch.strided for p in small.parameters())
    # the prepared model is untouched and still prunes/shrinks
    assert hasattr(model, MASK_BUFFER)
    pruner.prune(1)
    pruner.shrink()


def test_train_mode_outputs_match_too():
    """Per-channel BatchNorm statistics: a removed channel changes no other channel's statistics."""
    model, pruner, inputs = _pruned("rescnn", 0.5, 3)
    small = pruner.shrink()
    x = inputs(torch.Generator().manual_seed(5), 6)
    model.train()
    small.train()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_conv_weights_are_the_kept_slices():
    _model, pruner, _ = _pruned("resnet8-w4", 0.5, 2)
    small = pruner.shrink()
    clean = pruner.clean_copy()
    keep = pruner.keep_atoms()
    for name in ("stages.1.0.conv1", "stages.2.0.conv2"):
        space = next(s for s in pruner.analysis.spaces if s.name == name)
        out = torch.from_numpy(keep[space.atoms]).nonzero().flatten()
        consumer = pruner.analysis.consumers[name]
        cols = torch.from_numpy(keep[consumer.ids]).nonzero().flatten()
        expected = clean.get_submodule(name).weight[out][:, cols]
        torch.testing.assert_close(small.get_submodule(name).weight, expected)


def test_unequal_directions_become_a_pruned_rnn():
    torch.manual_seed(0)
    model = BiGRU().eval()
    x = torch.randn(2, 7, 5)
    pruner = TaylorPruner("random")
    pruner.prepare(model, (x,))
    reverse_l1 = next(u for u in pruner.units if u.name == "rnn.l1_reverse[2]")
    keep = pruner.keep_units().copy()
    keep[reverse_l1.index] = False
    pruner._set_keep(keep)
    small = pruner.shrink()
    assert isinstance(small.rnn, PrunedRNN)
    assert small.rnn.hidden_sizes == [[6, 6], [6, 5]]
    assert max_relative_difference(model, small, (x,)) < 1e-6


def test_equal_sizes_stay_a_standard_module():
    torch.manual_seed(0)
    model = BiGRU().eval()
    x = torch.randn(2, 7, 5)
    pruner = TaylorPruner("random")
    pruner.prepare(model, (x,))
    keep = pruner.keep_units().copy()
    for name in ("rnn.l0[1]", "rnn.l0_reverse[4]", "rnn.l1[0]", "rnn.l1_reverse[0]"):
        keep[next(u for u in pruner.units if u.name == name).index] = False
    pruner._set_keep(keep)
    small = pruner.shrink()
    assert type(small.rnn) is nn.GRU and small.rnn.hidden_size == 5 and small.rnn.input_size == 5
    assert small.fc.in_features == 10


def test_nothing_pruned_shrinks_to_the_same_function():
    _model, pruner, _inputs = _pruned("rescnn", 0.0, 0)
    small = pruner.shrink()
    assert sum(p.numel() for p in small.parameters()) == pruner.dense["params"] == \
        sum(p.numel() for p in pruner.clean_copy().parameters())


def test_channel_following_operations():
    """pad, interpolate, clamp, a literal-width view, permute, transpose, strided indexing, flip and
    cat along time, stack, spatial mean/amax: every layer stays prunable; only the output is fixed."""
    torch.manual_seed(0)
    model = randomize_batchnorm(Ops()).eval()
    pruner = TaylorPruner("random")
    pruner.prepare(model, (torch.randn(2, 1, 6, 6),))
    assert pruner.left_alone == {"head": "reaches the model output"}
    assert len(pruner.units) == 6 + 5 + 7
