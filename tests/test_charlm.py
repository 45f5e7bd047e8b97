"""Character-level language modelling of the King James Bible: vocabulary, splits, batches,
evaluation, a real learning check and pruning of :class:`CharLM`."""

import copy
import math

import numpy as np
import pytest
import torch

from compressor import MagnitudePruner, OneShot, PruneGroup, sparsity_report
from compressor.schedules import count_to_prune
from compressor.tasks.charlm import CharLMTask, CharVocabulary
from compressor.tasks.text import king_james_verses, split_point
from compressor.training import TrainConfig, train
from compressor.zoo.charlm import CharLM

SEQ_LEN = 64


@pytest.fixture(scope="module")
def task():
    return CharLMTask(seq_len=SEQ_LEN, batch_size=32, eval_chars=20_000)


@pytest.fixture
def one_thread():
    """train(threads=1) changes torch's global thread count: put it back afterwards."""
    threads = torch.get_num_threads()
    yield 1
    torch.set_num_threads(threads)


def test_vocabulary_round_trip(task):
    vocab = task.vocab
    assert 60 <= vocab.size <= 70
    assert list(vocab.symbols) == sorted(set(task.text))
    sample = task.text[:5000] + "".join(vocab.symbols)
    codes = vocab.encode(sample)
    assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < vocab.size
    assert vocab.decode(codes) == sample
    assert CharVocabulary("cab").encode("abc").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("naïve")


def test_splits_are_head_and_tail_of_the_text(task):
    assert task.text == "\n".join(king_james_verses())
    cut = split_point(len(task.text), 0.1)
    train_codes, test_codes = task.splits["train"], task.splits["test"]
    assert len(train_codes) == cut and len(train_codes) + len(test_codes) == len(task.text)
    assert task.vocab.decode(test_codes.numpy()) == task.text[cut:]
    assert torch.equal(test_codes, torch.from_numpy(task.vocab.encode(task.text[cut:])))
    assert task.text.endswith(task.vocab.decode(test_codes[-100:].numpy()))


def test_batches_are_reproducible_windows_of_the_training_text(task):
    first = task.batches(torch.Generator().manual_seed(7))
    second = task.batches(torch.Generator().manual_seed(7))
    for _ in range(3):
        (x1, y1), (x2, y2) = next(first), next(second)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == y1.shape == (32, SEQ_LEN) and x1.dtype == y1.dtype == torch.int64
        assert torch.equal(y1[:, :-1], x1[:, 1:])
    other_x, _ = next(task.batches(torch.Generator().manual_seed(8)))
    assert not torch.equal(other_x, x1)
    training_text = task.text[: len(task.splits["train"])]
    window = task.vocab.decode(torch.cat([x1[0], y1[0, -1:]]).numpy())
    assert window in training_text


def test_evaluate_is_mean_cross_entropy_over_consecutive_windows(task):
    small = copy.copy(task)
    small.eval_chars = 300  # 299 predictions: windows of 64, 64, 64, 64 and 43
    torch.manual_seed(0)
    model = CharLM(task.vocab.size, embed=8, hidden=16).eval()
    text = task.splits["test"][:300]
    nats = 0.0
    with torch.no_grad():
        for start in range(0, 299, SEQ_LEN):
            window = text[start:start + SEQ_LEN + 1].unsqueeze(0)
            logits = model(window[:, :-1])
            nats += float(torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum"))
    model.train()  # evaluate() must switch to eval mode and back
    result = small.evaluate(model)
    assert result["loss_nats"] == pytest.approx(nats / 299, rel=1e-5)
    assert result["bpc"] == pytest.approx(result["loss_nats"] / math.log(2))
    assert model.training
    assert result["bpc"] == pytest.approx(math.log2(task.vocab.size), abs=0.3)  # untrained: near uniform


def test_a_small_gru_learns_below_the_unigram_entropy(task, one_thread):
    counts = np.bincount(task.splits["train"].numpy(), minlength=task.vocab.size)
    p = counts[counts > 0] / counts.sum()
    unigram_bits = float(-(p * np.log2(p)).sum())
    assert 4.0 < unigram_bits < 4.5

    torch.manual_seed(0)
    model = CharLM(task.vocab.size, embed=32, hidden=128)
    train(model, task, TrainConfig(steps=200, lr=3e-3, threads=one_thread), progress=False)
    bpc = task.evaluate(model)["bpc"]
    assert bpc < 3.3 and bpc < unigram_bits - 1.0


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_pruner_prunes_recurrent_and_output_weights(task, cell, one_thread):
    torch.manual_seed(0)
    model = CharLM(task.vocab.size, embed=16, hidden=32, cell=cell)
    pruner = MagnitudePruner([PruneGroup(OneShot(0.8))])
    pruner.prepare(model)
    train(model, task, TrainConfig(steps=3, threads=one_thread), pruner, progress=False)
    rows = {row.name: row for row in sparsity_report(model)}
    pruned = {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "out.weight"}
    assert set(rows) == pruned | {"embedding.weight"}
    for name in pruned:
        assert rows[name].pruned == count_to_prune(0.8, rows[name].total)
    assert rows["embedding.weight"].pruned == 0
    assert model(torch.zeros(2, 5, dtype=torch.int64)).shape == (2, 5, task.vocab.size)
    finalized = pruner.finalize()
    assert {row.name: row.pruned for row in sparsity_report(finalized)} == {n: r.pruned for n, r in rows.items()}


def test_unknown_cell_is_rejected():
    with pytest.raises(ValueError, match="cell"):
        CharLM(10, cell="rnn")
