"""The pruner: exact sparsity, masks that hold through optimizers, resume, finalize."""

import io
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor import (
    BlockShape,
    CubicSchedule,
    MagnitudePruner,
    OneShot,
    PruneGroup,
    ThresholdSchedule,
    block_scores,
    format_report,
    group_lasso,
    quantile_threshold,
    sparsity_report,
)
from compressor.masking import find_mask
from compressor.schedules import count_to_prune
from compressor.selection import PRUNABLE_TYPES, RECURRENT_TYPES

from .models import Mixed, batch, loss_fn

EXPECTED_WEIGHTS = {
    "conv.weight", "conv1d.weight", "fc.weight",
    *(f"{rnn}.weight_{kind}_l{layer}{suffix}"
      for rnn in ("gru", "lstm") for kind in ("ih", "hh") for layer in (0, 1) for suffix in ("", "_reverse")),
}


def masks_of(pruner):
    return {ref.name: find_mask(ref.module, ref.attr).mask.clone() for ref in pruner.weights}


def effective(pruner):
    return {ref.name: getattr(ref.module, ref.attr).detach().clone() for ref in pruner.weights}


def test_selects_every_weight_and_never_biases_or_norms():
    model = Mixed()
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5))])
    pruner.prepare(model)
    assert {ref.name for ref in pruner.weights} == EXPECTED_WEIGHTS
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            assert not parametrize.is_parametrized(module)
        elif parametrize.is_parametrized(module):
            assert all(name.startswith("weight") for name in module.parametrizations)
    assert not any("bias" in key and "mask" in key for key in model.state_dict())
    assert not any(key.startswith(("bn.", "norm.")) and "parametrizations" in key for key in model.state_dict())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95])
def test_one_shot_reaches_exact_sparsity_per_layer(sparsity):
    torch.manual_seed(0)
    model = Mixed()
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity))])
    pruner.prepare(model)
    pruner.step()
    for row in pruner.report():
        assert row.pruned == count_to_prune(sparsity, row.total), row
    # the smallest magnitudes went: every kept |w| >= every pruned |w|
    for ref in pruner.weights:
        original = ref.module.parametrizations[ref.attr].original.detach().abs()
        mask = find_mask(ref.module, ref.attr).mask
        if 0 < mask.sum() < mask.numel():
            assert original[mask].min() >= original[~mask].max()


@pytest.mark.parametrize("block", [BlockShape(4, 4), BlockShape(16, 1), BlockShape(3, 5), BlockShape(1, 8)])
def test_block_pruning_reaches_exact_block_sparsity(block):
    torch.manual_seed(1)
    model = Mixed()
    pruner = MagnitudePruner([PruneGroup(OneShot(0.8), block=block, block_score="l2")])
    pruner.prepare(model)
    pruner.step()
    for row in pruner.report():
        assert row.block == str(block)
        assert row.blocks_pruned == count_to_prune(0.8, row.blocks_total), row
    # masks are made of whole blocks: every block is all-kept or all-pruned
    for ref in pruner.weights:
        mask = find_mask(ref.module, ref.attr).mask
        kept_count = block_scores(mask.float(), block, "l2").pow(2)  # number of kept elements per block
        full = block_scores(torch.ones_like(mask, dtype=torch.float), block, "l2").pow(2)
        assert torch.all((kept_count.round() == 0) | (kept_count.round() == full.round()))


def test_block_scores_hand_computed():
    w = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -4.0], [0.1, 0.2, 0.3]])
    block = BlockShape(2, 2)  # 3x3 → 2x2 grid, edge blocks are smaller
    assert torch.equal(block_scores(w, block, "max"), torch.tensor([[3.0, 4.0], [0.2, 0.3]]))
    expected_l2 = torch.tensor([[14.0, 16.25], [0.05, 0.09]]).sqrt()
    assert torch.allclose(block_scores(w, block, "l2"), expected_l2)
    assert BlockShape.parse("16x1") == BlockShape(16, 1)
    with pytest.raises(ValueError, match="RxC"):
        BlockShape.parse("16by1")


def test_group_lasso_value_and_gradient():
    w = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 12.0]], requires_grad=True)
    value = group_lasso(w, BlockShape(2, 2))  # blocks: [[3,4],[0,0]] → 5 ; [[0],[12]] → 12
    assert value.item() == pytest.approx(17.0, rel=1e-6)
    value.backward()
    assert torch.allclose(w.grad, torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]), atol=1e-6)

    model = Mixed()
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5), block=BlockShape(2, 2))])
    pruner.prepare(model)
    total = sum(group_lasso(getattr(r.module, r.attr), BlockShape(2, 2)) for r in pruner.weights)
    assert pruner.group_lasso(0.1).item() == pytest.approx(0.1 * total.item(), rel=1e-5)


def test_cubic_schedule_gives_exact_sparsity_at_each_update_during_training():
    torch.manual_seed(2)
    model = Mixed()
    schedule = CubicSchedule(final_sparsity=0.9, start_itr=2, n_steps=4, delta_t=3)
    pruner = MagnitudePruner([PruneGroup(schedule)])
    pruner.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    previous = masks_of(pruner)
    for itr in range(1, 20):
        loss_fn(model, *batch(generator)).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        current = masks_of(pruner)
        for name in current:  # pruned weights never come back
            assert not torch.any(current[name] & ~previous[name]), name
        previous = current
        if schedule.is_update_step(itr):
            for row in pruner.report():
                assert row.pruned == count_to_prune(schedule.target(itr), row.total), (itr, row)
    assert pruner.itr == 19


def test_threshold_schedule_with_final_sparsity_is_exact_on_fixed_weights():
    torch.manual_seed(3)
    model = Mixed()
    schedule = ThresholdSchedule(start_itr=0, ramp_itr=20, end_itr=50, freq=5)
    pruner = MagnitudePruner([PruneGroup(schedule, final_sparsity=0.9)])
    pruner.prepare(model)
    sparsities = []
    for _ in range(60):
        pruner.step()
        sparsities.append(sum(r.pruned for r in pruner.report()))
    assert sparsities == sorted(sparsities)  # monotone
    for row in pruner.report():
        assert row.pruned == count_to_prune(0.9, row.total), row


def test_threshold_schedule_default_q_is_90th_percentile():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(50, 40))
    weights = model[0].weight.detach().abs().clone()
    schedule = ThresholdSchedule(start_itr=0, ramp_itr=10, end_itr=30, freq=10)
    pruner = MagnitudePruner([PruneGroup(schedule)])
    pruner.prepare(model)
    for _ in range(10):
        pruner.step()
    q = pruner.state_dict()["q"]["0.weight"]
    assert q == pytest.approx(float(torch.quantile(weights.double(), 0.9)), rel=1e-12)
    threshold = schedule.target(10, q=q)
    assert torch.equal(find_mask(model[0], "weight").mask, weights >= threshold)


def test_global_ranking_prunes_exactly_over_the_group():
    torch.manual_seed(5)
    model = Mixed()
    with torch.no_grad():
        model.fc.weight.mul_(100.0)  # fc is far larger: global ranking keeps it
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5), ranking="global")])
    pruner.prepare(model)
    pruner.step()
    rows = pruner.report()
    total = sum(r.total for r in rows)
    assert sum(r.pruned for r in rows) == count_to_prune(0.5, total)
    fc = next(r for r in rows if r.name == "fc.weight")
    assert fc.sparsity < 0.05  # a per-layer ranking would prune 50 % of it


def test_groups_have_their_own_hyper_parameters_and_first_match_wins():
    model = Mixed()
    pruner = MagnitudePruner([
        PruneGroup(OneShot(0.9), types=RECURRENT_TYPES, include=r"weight_hh"),
        PruneGroup(OneShot(0.5)),
    ])
    pruner.prepare(model)
    pruner.step()
    for row in pruner.report():
        expected = 0.9 if re.search("weight_hh", row.name) else 0.5
        assert row.pruned == count_to_prune(expected, row.total), row


def test_embedding_is_opt_in():
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 4))
    pruner = MagnitudePruner([PruneGroup(OneShot(0.75), types=PRUNABLE_TYPES)])
    pruner.prepare(model)
    pruner.step()
    assert [r.name for r in pruner.report()] == ["0.weight", "1.weight"]
    default = MagnitudePruner([PruneGroup(OneShot(0.75))])
    default.prepare(nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 4)))
    assert [r.name for r in default.weights] == ["1.weight"]


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
], ids=["adam", "adamw", "sgd-nesterov"])
def test_pruned_weights_stay_zero_through_optimizer_steps(make_optimizer):
    torch.manual_seed(6)
    model = Mixed()
    pruner = MagnitudePruner([PruneGroup(OneShot(0.8, at_itr=3))])
    pruner.prepare(model)
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(1)
    for itr in range(1, 15):
        loss_fn(model, *batch(generator)).backward()
        optimizer.step()
        if itr > 3:  # after the mask exists, momentum and weight decay must not revive pruned weights
            for ref in pruner.weights:
                mask = find_mask(ref.module, ref.attr).mask
                weight = getattr(ref.module, ref.attr)
                assert torch.count_nonzero(weight[~mask]) == 0, ref.name
                assert torch.count_nonzero(ref.module.parametrizations[ref.attr].original.grad[~mask]) == 0
        optimizer.zero_grad()
        pruner.step()
    assert sum(r.pruned for r in pruner.report()) > 0


def _run(steps, *, resume_at=None):
    """Seeded pruning run; with resume_at, save at that step and continue in fresh objects."""
    def build():
        torch.manual_seed(7)
        model = Mixed()
        pruner = MagnitudePruner([
            PruneGroup(ThresholdSchedule(start_itr=2, ramp_itr=8, end_itr=16, freq=2), types=RECURRENT_TYPES,
                       final_sparsity=0.8),
            PruneGroup(CubicSchedule(0.7, start_itr=3, n_steps=4, delta_t=3), block=BlockShape(2, 3)),
        ])
        pruner.prepare(model)
        return model, pruner, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)

    model, pruner, optimizer = build()
    generator = torch.Generator().manual_seed(2)
    for itr in range(steps):
        if itr == resume_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "pruner": pruner.state_dict(),
                        "optimizer": optimizer.state_dict(), "rng": generator.get_state()}, buffer)
            buffer.seek(0)
            ckpt = torch.load(buffer, weights_only=True)
            model, pruner, optimizer = build()
            model.load_state_dict(ckpt["model"])
            pruner.load_state_dict(ckpt["pruner"])
            optimizer.load_state_dict(ckpt["optimizer"])
            generator.set_state(ckpt["rng"])
        model.train()
        loss_fn(model, *batch(generator)).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    return model, pruner


def test_save_load_resume_is_bit_exact():
    straight, straight_pruner = _run(24)
    resumed, resumed_pruner = _run(24, resume_at=9)  # mid-schedule: threshold q already calibrated
    assert straight_pruner.state_dict() == resumed_pruner.state_dict()
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sum(r.pruned for r in straight_pruner.report()) > 0


def test_finalize_gives_plain_model_with_equal_outputs():
    torch.manual_seed(8)
    model = Mixed()
    original_keys = list(model.state_dict().keys())
    pruner = MagnitudePruner([PruneGroup(OneShot(0.9), block=BlockShape(4, 1))])
    pruner.prepare(model)
    pruner.step()
    model.eval()
    x, _ = batch(torch.Generator().manual_seed(3))
    masked_output = model(x)
    report_before = pruner.report()
    plain = pruner.finalize()
    assert list(plain.state_dict().keys()) == original_keys
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert type(plain.gru) is nn.GRU and type(plain.fc) is nn.Linear and type(plain.conv) is nn.Conv2d
    assert torch.equal(plain(x), masked_output)
    reloaded = Mixed()
    reloaded.load_state_dict(plain.state_dict())
    reloaded.eval()
    assert torch.equal(reloaded(x), masked_output)
    after = {r.name: r.pruned for r in sparsity_report(plain)}
    assert all(after[r.name] >= r.pruned for r in report_before)  # zeros are baked in
    with pytest.raises(RuntimeError, match="prepare"):
        pruner.step()


def test_report_table_and_dicts():
    model = nn.Sequential(nn.Linear(10, 10), nn.GRU(10, 4))
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5))])
    pruner.prepare(model)
    pruner.step()
    rows = pruner.report()
    text = format_report(rows)
    assert "0.weight" in text and "1.weight_hh_l0" in text and "TOTAL" in text and "50.00%" in text
    d = rows[0].as_dict()
    assert d["shape"] == [10, 10] and d["pruned"] == 50 and d["sparsity"] == 0.5


def test_quantile_threshold_splits_exactly():
    scores = torch.randperm(1000).double()
    t = quantile_threshold(scores, 0.9)
    assert int((scores < t).sum()) == 900


def test_clear_errors():
    with pytest.raises(ValueError, match="no prunable weight"):
        MagnitudePruner([PruneGroup(OneShot(0.5), include="nothing-matches")]).prepare(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="outside"):
        OneShot(1.5)
    pruner = MagnitudePruner([PruneGroup(OneShot(0.5))])
    pruner.prepare(nn.Linear(3, 3))
    with pytest.raises(RuntimeError, match="already prepared"):
        pruner.prepare(nn.Linear(3, 3))


from hypothesis import given, settings, strategies as st


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40), cols=st.integers(1, 40),
    block_rows=st.integers(1, 16), block_cols=st.integers(1, 16),
    sparsity=st.floats(0.0, 0.99), score=st.sampled_from(["max", "l2"]), seed=st.integers(0, 2**31 - 1),
)
def test_exact_block_sparsity_for_any_shape(rows, cols, block_rows, block_cols, sparsity, score, seed):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=generator))
    block = BlockShape(block_rows, block_cols)
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity), block=block, block_score=score)])
    if block_rows > rows and block_cols > cols:  # one block larger than the whole weight: refused
        with pytest.raises(ValueError, match="in both dimensions"):
            pruner.prepare(layer)
        return
    pruner.prepare(layer)
    pruner.step()
    (row,) = pruner.report()
    assert row.blocks_total == -(-rows // block_rows) * -(-cols // block_cols)
    assert row.blocks_pruned == count_to_prune(sparsity, row.blocks_total)
    mask = find_mask(layer, "weight").mask
    assert int((~mask).sum()) == row.pruned
