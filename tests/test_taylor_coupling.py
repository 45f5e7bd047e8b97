"""Coupled structures stay consistent: residual additions, concatenations, depthwise and grouped
convolutions, recurrent gates and directions; unhandled structures are reported and left alone."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compressor.taylor import TaylorPruner, max_relative_difference
from compressor.zoo import build_model

from .test_taylor_models import Awkward, BiGRU, ResCNN, SummedGRU, UntraceableRoot, randomize_batchnorm


def _prepare(model, *inputs, criterion="random", **kw):
    pruner = TaylorPruner(criterion, **kw)
    pruner.prepare(model, inputs)
    return pruner


def _remove(pruner, *names):
    keep = pruner.keep_units().copy()
    for name in names:
        keep[next(u for u in pruner.units if u.name == name).index] = False
    pruner._set_keep(keep)


def _space(pruner, name):
    return next(s for s in pruner.analysis.spaces if s.name == name)


def test_resnet_residual_channels_are_tied_across_the_addition():
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model("resnet8", width=4)).eval()
    pruner = _prepare(model, torch.randn(2, 1, 28, 28))
    by_layers = {frozenset(pruner.analysis.spaces[s].name for s in u.spaces) for u in pruner.units}
    assert by_layers == {frozenset({"conv", "stages.0.0.conv2"}), frozenset({"stages.0.0.conv1"}),
                         frozenset({"stages.1.0.conv1"}), frozenset({"stages.1.0.conv2", "stages.1.0.shortcut.0"}),
                         frozenset({"stages.2.0.conv1"}), frozenset({"stages.2.0.conv2", "stages.2.0.shortcut.0"})}
    assert pruner.left_alone == {"fc": "reaches the model output"}
    _remove(pruner, "conv[1]+stages.0.0.conv2[1]", "stages.1.0.conv2[3]+stages.1.0.shortcut.0[3]")
    small = pruner.shrink()
    m = small.get_submodule
    assert m("conv").out_channels == m("stages.0.0.conv2").out_channels == 3
    assert m("stages.0.0.conv1").in_channels == m("stages.1.0.shortcut.0").in_channels == 3
    assert m("stages.1.0.conv2").out_channels == m("stages.1.0.shortcut.0").out_channels == 7
    assert m("stages.2.0.conv1").in_channels == m("stages.2.0.shortcut.0").in_channels == 7


def test_concat_depthwise_and_grouped_couplings():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResCNN()).eval()
    pruner = _prepare(model, torch.randn(2, 1, 8, 8))
    a = pruner.analysis
    cls = pruner.atom_class
    depthwise, grouped = _space(pruner, "depthwise"), _space(pruner, "grouped")
    dw_in = a.consumers["depthwise"].ids  # 8 channels of block2, then 4 of side (concatenation)
    assert list(dw_in[:8]) == list(_space(pruner, "block2.conv2").atoms)
    assert list(dw_in[8:]) == list(_space(pruner, "side").atoms)
    for c in range(12):  # depthwise, multiplier 2: input c with outputs 2c and 2c + 1
        assert cls[dw_in[c]] == cls[depthwise.atoms[2 * c]] == cls[depthwise.atoms[2 * c + 1]]
    for g in range(1, 4):  # grouped, 4 groups: output position j of every group tied
        for j in range(2):
            assert cls[grouped.atoms[g * 2 + j]] == cls[grouped.atoms[j]]
    for seed in range(4):
        pruner2 = _prepare(randomize_batchnorm(ResCNN()).eval(), torch.randn(2, 1, 8, 8), seed=seed)
        pruner2.prune(len(pruner2.units) // 2)
        small = pruner2.shrink()
        assert small.depthwise.groups == small.depthwise.in_channels
        assert small.depthwise.out_channels == 2 * small.depthwise.in_channels
        assert small.grouped.groups == 4 and small.grouped.in_channels % 4 == 0 and small.grouped.out_channels % 4 == 0


def test_gru_unit_removal_takes_rows_of_every_gate_and_the_next_layers_columns():
    torch.manual_seed(0)
    model = BiGRU().eval()
    x = torch.randn(2, 7, 5)
    pruner = _prepare(model, x)
    original = {k: v.clone() for k, v in pruner.clean_copy().state_dict().items()}
    for name in ("rnn.l0_reverse[2]", "rnn.l0[2]", "rnn.l1[5]", "rnn.l1_reverse[0]"):
        _remove(pruner, name)
    small = pruner.shrink()
    H = 6
    keep0 = [k for k in range(H) if k != 2]
    keep1_f, keep1_b = [k for k in range(H) if k != 5], [k for k in range(H) if k != 0]
    rows = lambda keep: [g * H + k for g in range(3) for k in keep]
    state = small.state_dict()
    for sfx, keep in (("l0", keep0), ("l0_reverse", keep0)):
        torch.testing.assert_close(state[f"rnn.weight_ih_{sfx}"], original[f"rnn.weight_ih_{sfx}"][rows(keep)])
        torch.testing.assert_close(state[f"rnn.weight_hh_{sfx}"], original[f"rnn.weight_hh_{sfx}"][rows(keep)][:, keep])
        torch.testing.assert_close(state[f"rnn.bias_hh_{sfx}"], original[f"rnn.bias_hh_{sfx}"][rows(keep)])
    cols = keep0 + [H + k for k in keep0]  # columns d·H + k of layer 1 for the kept layer-0 units
    torch.testing.assert_close(state["rnn.weight_ih_l1"], original["rnn.weight_ih_l1"][rows(keep1_f)][:, cols])
    torch.testing.assert_close(state["rnn.weight_ih_l1_reverse"],
                               original["rnn.weight_ih_l1_reverse"][rows(keep1_b)][:, cols])
    fc_cols = keep1_f + [H + k for k in keep1_b]
    torch.testing.assert_close(state["fc.weight"], original["fc.weight"][:, fc_cols])
    assert max_relative_difference(model, small, (x,)) < 1e-6


def test_masked_recurrent_unit_is_exactly_zero():
    torch.manual_seed(0)
    for cell in (nn.GRU, nn.LSTM, nn.RNN):
        model = BiGRU(cell).eval()
        x = torch.randn(2, 7, 5)
        pruner = _prepare(model, x)
        _remove(pruner, "rnn.l1_reverse[4]")
        with torch.no_grad():
            out, _ = model.rnn(x)
        assert torch.all(out[..., 6 + 4] == 0) and torch.all(out[..., :6 + 4] != 0)


def test_summed_directions_are_tied():
    torch.manual_seed(0)
    model = SummedGRU().eval()
    pruner = _prepare(model, torch.randn(7, 2, 5))
    tied = [u.name for u in pruner.units if "rnn1" in u.name]
    assert tied == [f"rnn1.l0[{k}]+rnn1.l0_reverse[{k}]" for k in range(6)]
    _remove(pruner, "rnn1.l0[3]+rnn1.l0_reverse[3]")
    small = pruner.shrink()
    assert small.rnn1.hidden_size == 5 and small.rnn2.input_size == 5
    assert isinstance(small, SummedGRU) and ".view(getitem_2, getitem_3, 2, 5)" in type(small)._taylor_code
    assert max_relative_difference(model, small, (torch.randn(7, 3, 5),)) < 1e-6


def test_unhandled_structures_are_reported_and_left_alone():
    torch.manual_seed(0)
    model = Awkward().eval()
    pruner = _prepare(model, torch.randn(3, 5, 4))
    left = pruner.left_alone
    assert left["loop (Loop)"].startswith("not traceable by torch.fx")
    assert "LayerNorm" in left["a"] and "sigmoid" in left["c"] and "h_n" in left["gru.l0"]
    assert "constant" in left["f"] and left["out"] == "reaches the model output"
    layers = {pruner.analysis.spaces[s].name for u in pruner.units for s in u.spaces}
    assert layers == {"b", "d", "e"}
    pruner.prune(len(pruner.units))  # as much as allowed: every layer keeps one unit
    small = pruner.shrink()
    assert small.a.out_features == 6 and small.c.out_features == 4 and small.gru.hidden_size == 3
    assert small.b.out_features == small.d.out_features == small.e.out_features == 1


def test_untraceable_root_is_analysed_child_by_child():
    torch.manual_seed(0)
    model = randomize_batchnorm(UntraceableRoot()).eval()
    pruner = _prepare(model, torch.randn(2, 1, 6, 6))
    assert "TraceError" in pruner.left_alone["<model> (UntraceableRoot)"]
    assert {pruner.analysis.spaces[s].name for u in pruner.units for s in u.spaces} == {"features.0", "head.1"}
    pruner.prune(8)
    small = pruner.shrink()
    assert type(small) is UntraceableRoot and type(small.features) is nn.Sequential
    assert small.features[0].out_channels + 8 >= 6 and small.head[1].in_features == small.features[3].out_channels * 36


@settings(max_examples=25, deadline=None)
@given(fraction=st.floats(0.0, 1.0), seed=st.integers(0, 10_000), model=st.sampled_from(["rescnn", "bigru", "summed"]))
def test_any_removal_keeps_the_couplings_consistent(fraction, seed, model):
    torch.manual_seed(seed)
    factory, x = {"rescnn": (ResCNN, torch.randn(2, 1, 8, 8)), "bigru": (BiGRU, torch.randn(2, 4, 5)),
                  "summed": (SummedGRU, torch.randn(4, 2, 5))}[model]
    net = randomize_batchnorm(factory(), torch.Generator().manual_seed(seed)).eval()
    pruner = _prepare(net, x, seed=seed)
    pruner.prune(int(fraction * len(pruner.units)))
    kept = pruner.keep_atoms()
    for unit in pruner.units:  # a unit is removed whole or not at all
        assert len(set(kept[unit.atoms])) == 1
    for space in pruner.analysis.spaces:
        assert kept[space.atoms].sum() >= 1
    small = pruner.shrink()
    assert max_relative_difference(net, small, (x,)) < 1e-5
    assert sum(p.numel() for p in small.parameters()) == pruner.remaining()["params"]


def test_min_units_per_layer():
    torch.manual_seed(0)
    model = BiGRU().eval()
    pruner = _prepare(model, torch.randn(2, 4, 5), min_units=3)
    pruner.prune(1000)
    kept = pruner.keep_atoms()
    assert all(kept[s.atoms].sum() == 3 for s in pruner.analysis.spaces if s.name != "fc")
    assert np.all(kept[_space(pruner, "fc").atoms])
