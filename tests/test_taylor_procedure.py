"""The procedure: prune every M steps, stop at a params / FLOPs / units / metric target, inside
the project's training loop, resume, and a real accuracy check on scikit-learn's digits."""

import copy

import pytest
import torch
from torch import nn

from compressor.taylor import PruneTarget, TaylorPruner, prune_finetune
from compressor.training import TrainConfig, train

from .test_taylor_models import ResCNN, randomize_batchnorm, trained_digits_copy


@pytest.fixture
def trained_digits():
    return trained_digits_copy()


class RandomTask:
    """Random images and labels for ResCNN (a Task)."""

    name, metric, higher_is_better = "random", "accuracy", True

    def batches(self, generator):
        while True:
            yield torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 5, (8,), generator=generator)

    def loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def evaluate(self, model, split="test"):
        return {"accuracy": 0.0}


def _prepared(**kw):
    torch.manual_seed(0)
    model = randomize_batchnorm(ResCNN())
    pruner = TaylorPruner(**kw)
    pruner.prepare(model, (torch.randn(2, 1, 8, 8),))
    return model, pruner


def test_every_m_steps_n_units():
    model, pruner = _prepared(every=3, per_prune=2)
    curve = prune_finetune(model, RandomTask(), pruner, steps=10)
    assert [h["itr"] for h in pruner.history] == [3, 6, 9]
    assert all(len(h["removed"]) == 2 for h in pruner.history)
    assert int((~pruner.keep_units()[1:]).sum()) == 6
    assert [p["step"] for p in curve] == [0, 3, 6, 9, 10]  # points just before each round, and the end
    assert curve[1]["params"] == curve[0]["params"] == pruner.dense["params"]
    assert [p["params"] for p in curve[2:]] == [h["params"] for h in pruner.history]


@pytest.mark.parametrize("kind,value", [("params", 0.5), ("flops", 0.4), ("units", 0.7), ("params", 3000)])
def test_stops_at_the_target(kind, value):
    model, pruner = _prepared(every=2, per_prune=4, target=PruneTarget(kind, value))
    prune_finetune(model, RandomTask(), pruner, steps=200)
    now, dense = pruner.remaining(), pruner.dense
    limit = value * dense[kind] if value <= 1 else value
    assert now[kind] <= limit
    assert pruner.done
    last = pruner.history[-1]
    before_last = pruner.history[-2][kind] if len(pruner.history) > 1 else dense[kind]
    assert before_last > limit  # the last round was needed, and it stopped as soon as the target was met
    small = pruner.shrink()
    assert sum(p.numel() for p in small.parameters()) == now["params"] == last["params"]


def test_metric_target_undoes_the_round_that_crosses_the_limit():
    values = iter([0.9, 0.8, 0.7, 0.4, 0.3])
    model, pruner = _prepared(every=1, per_prune=3, target=PruneTarget("metric", 0.5, metric=lambda m: next(values)))
    prune_finetune(model, RandomTask(), pruner, steps=10)
    assert pruner.done
    assert [h["metric"] for h in pruner.history] == [0.9, 0.8, 0.7]
    assert int((~pruner.keep_units()[1:]).sum()) == 9


def test_runs_inside_the_project_training_loop():
    model, pruner = _prepared(every=5, per_prune=3)
    train(model, RandomTask(), TrainConfig(steps=20), pruner, progress=False)
    assert pruner.itr == 20 and len(pruner.history) == 4
    pruner.shrink()


def test_resume_from_state_dicts():
    model, pruner = _prepared(every=2, per_prune=2, criterion="taylor_fo_gate")
    prune_finetune(model, RandomTask(), pruner, steps=7)
    saved_model, saved_pruner = copy.deepcopy(model.state_dict()), pruner.state_dict()
    torch.manual_seed(0)
    fresh = randomize_batchnorm(ResCNN())
    resumed = TaylorPruner(every=2, per_prune=2)
    resumed.prepare(fresh, (torch.randn(2, 1, 8, 8),))
    fresh.load_state_dict(saved_model)
    resumed.load_state_dict(saved_pruner)
    assert (resumed.keep_units() == pruner.keep_units()).all() and resumed.itr == 7
    torch.testing.assert_close(resumed.importance(), pruner.importance())
    assert resumed.prune(3) == pruner.prune(3)


def test_second_order_criterion_in_the_loop():
    model, pruner = _prepared(criterion="taylor_so_gate", every=2, per_prune=2)
    prune_finetune(model, RandomTask(), pruner, steps=4)
    assert len(pruner.history) == 2


def test_real_accuracy_after_pruning_70_percent_of_the_parameters(trained_digits):
    """Trained digits CNN (about 98 % test accuracy): Taylor FO + fine-tuning to 30 % of the
    parameters keeps 95 %; the shrunk model scores what the masked one scores."""
    model, task = trained_digits
    dense = task.evaluate(model)["accuracy"]
    pruner = TaylorPruner(every=10, per_prune=4, target=PruneTarget("params", 0.3))
    pruner.prepare(model, (task.images["test"][:4],))
    curve = prune_finetune(model, task, pruner, steps=300, lr=1e-3)
    small = pruner.shrink()
    accuracy = task.evaluate(small)["accuracy"]
    assert dense > 0.95 and accuracy > 0.95
    assert accuracy == pytest.approx(curve[-1]["accuracy"])
    assert sum(p.numel() for p in small.parameters()) <= 0.3 * pruner.dense["params"]
