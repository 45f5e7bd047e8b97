"""Image tasks and the CIFAR ResNet: the IDX loader, scikit-learn's digits, ResNet shapes and
sizes, and a real train → prune → fine-tune run on the digits."""

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from compressor import MagnitudePruner, OneShot, PruneGroup, sparsity_report
from compressor.tasks.images import FASHION_MNIST_FILES, ImageTask, load_fashion_mnist, load_sklearn_digits, parse_idx
from compressor.training import TrainConfig, train
from compressor.zoo.resnet import ResNet, resnet8, resnet20


@pytest.fixture(scope="module")
def digits_task():
    return ImageTask("digits", batch_size=64)


@pytest.fixture
def one_thread():
    """Convolutions this small gain nothing from a second thread, and OpenMP threads that spin
    on a busy machine make them 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_is_read_from_the_debian_package():
    splits = load_fashion_mnist()
    for split, count in (("train", 60_000), ("test", 10_000)):
        images, labels = splits[split]
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (count,) and labels.dtype == np.int64
        assert set(np.unique(labels).tolist()) == set(range(10))
    assert splits["train"][0].max() == 255  # real pictures, not an empty file of zeros


def test_parse_idx_reads_the_header():
    header = bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    array = parse_idx(header + np.arange(6, dtype=">i4").tobytes())
    assert array.shape == (2, 3) and array.tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="magic"):
        parse_idx(bytes([0x1F, 0x8B, 8, 0]))
    with pytest.raises(ValueError, match="needs 24 bytes"):
        parse_idx(header + bytes(5))


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    missing = r"train-images-idx3-ubyte\.gz is missing.*`apt-get install dataset-fashion-mnist`"
    with pytest.raises(RuntimeError, match=missing):
        load_fashion_mnist(tmp_path)


def test_corrupt_fashion_mnist_names_the_debian_package(tmp_path):
    for images, labels in FASHION_MNIST_FILES.values():
        (tmp_path / images).write_bytes(b"this is not gzip")
        with gzip.open(tmp_path / labels, "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(RuntimeError, match=r"train-images-idx3-ubyte\.gz.*dataset-fashion-mnist") as error:
        load_fashion_mnist(tmp_path)
    assert "\n" not in str(error.value)
    # a valid gzip stream whose IDX body is too short
    for images, _ in FASHION_MNIST_FILES.values():
        with gzip.open(tmp_path / images, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28)) + bytes(100))
    with pytest.raises(RuntimeError, match="needs 2352 bytes.*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


# ---------------------------------------------------------------------- scikit-learn digits
def test_sklearn_digits_split_is_fixed():
    first, second = load_sklearn_digits(), load_sklearn_digits()
    (train_x, train_y), (test_x, test_y) = first["train"], first["test"]
    assert train_x.shape == (1438, 8, 8) and test_x.shape == (359, 8, 8)  # 359 = round(0.2 · 1797)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64 and train_x.max() == 16
    assert set(np.unique(test_y).tolist()) == set(range(10))
    for split in ("train", "test"):
        assert all(np.array_equal(a, b) for a, b in zip(first[split], second[split]))


def test_batches_depend_on_the_generator_only(digits_task):
    def first_three(generator):
        stream = digits_task.batches(generator)
        return [next(stream) for _ in range(3)]

    a = first_three(torch.Generator().manual_seed(7))
    b = first_three(torch.Generator().manual_seed(7))
    c = first_three(torch.Generator().manual_seed(8))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (64, 1, 8, 8) and xa.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])
    # resuming from a saved generator state continues the same stream
    generator = torch.Generator().manual_seed(7)
    stream = digits_task.batches(generator)
    next(stream)
    resumed = digits_task.batches(torch.Generator().manual_seed(0).set_state(generator.get_state()))
    assert torch.equal(next(resumed)[0], a[1][0]) and torch.equal(next(resumed)[0], a[2][0])


def test_images_are_normalized_with_training_statistics(digits_task):
    train_images = digits_task.images["train"]
    assert train_images.shape == (1438, 1, 8, 8)
    assert abs(float(train_images.mean())) < 1e-4 and abs(float(train_images.std()) - 1) < 1e-3
    calibration = digits_task.calibration_batches(2)
    assert [tuple(x.shape) for x in calibration] == [(64, 1, 8, 8)] * 2
    assert torch.equal(calibration[1], train_images[64:128])
    with pytest.raises(ValueError, match="exceed"):
        digits_task.calibration_batches(23)  # 23 · 64 = 1472 > 1438


# ---------------------------------------------------------------------- ResNet
def test_resnet_output_shapes(one_thread):
    x = torch.randn(2, 1, 28, 28)
    assert resnet8()(x).shape == (2, 10)
    assert resnet20(width=8, num_classes=7)(x).shape == (2, 7)
    assert ResNet(depth=14, in_channels=3)(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert len([m for m in resnet20().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]) == 20 + 2  # + 2 projections


def test_resnet_parameter_counts():
    # width w = 16, one input channel, 10 classes; convolutions have no bias, BatchNorm has 2 per channel
    stem = 1 * 16 * 9 + 2 * 16                                      # 144 + 32 = 176
    block_16 = 2 * (16 * 16 * 9 + 2 * 16)                           # 2 · 2,336 = 4,672
    # first block of a stage: conv1 + BN, conv2 + BN, 1×1 projection + BN
    block_16_32 = (16 * 32 * 9 + 2 * 32) + (32 * 32 * 9 + 2 * 32) + (16 * 32 + 2 * 32)  # 4,672 + 9,280 + 576
    block_32 = 2 * (32 * 32 * 9 + 2 * 32)                           # 2 · 9,280 = 18,560
    block_32_64 = (32 * 64 * 9 + 2 * 64) + (64 * 64 * 9 + 2 * 64) + (32 * 64 + 2 * 64)  # 18,560 + 36,992 + 2,176
    block_64 = 2 * (64 * 64 * 9 + 2 * 64)                           # 2 · 36,992 = 73,984
    classifier = 64 * 10 + 10                                       # 650
    resnet8_params = stem + block_16 + block_16_32 + block_32_64 + classifier
    resnet20_params = resnet8_params + 2 * (block_16 + block_32 + block_64)
    assert (resnet8_params, resnet20_params) == (77_754, 272_186)
    # the paper's "0.27M" for ResNet-20 (3 input channels, zero-padding shortcuts) is 269,722 exactly
    assert resnet20_params + 2 * 16 * 9 - (16 * 32 + 2 * 32) - (32 * 64 + 2 * 64) == 269_722

    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(resnet8()) == resnet8_params
    assert count(resnet20()) == resnet20_params


@pytest.mark.parametrize("depth", [0, 2, 6, 10, 21])
def test_resnet_rejects_depths_not_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet(depth=depth)


# ---------------------------------------------------------------------- training and pruning
def test_resnet8_learns_digits_and_survives_half_pruning(digits_task, one_thread):
    torch.manual_seed(0)
    model = resnet8(width=8)
    train(model, digits_task, TrainConfig(steps=300, lr=3e-3, cosine=True), progress=False)
    trained = digits_task.evaluate(model)
    assert trained["accuracy"] > 0.9, trained
    assert not model.training

    pruner = MagnitudePruner([PruneGroup(OneShot(0.5))])
    pruner.prepare(model)
    train(model, digits_task, TrainConfig(steps=100, lr=1e-3, seed=1), pruner=pruner, progress=False)
    model = pruner.finalize()
    pruned = digits_task.evaluate(model)
    assert pruned["accuracy"] > 0.85, pruned
    convs = [row for row in sparsity_report(model) if len(row.shape) == 4]
    assert len(convs) == 9  # stem, 3 · 2 block convolutions, 2 projections
    assert all(row.pruned == row.total // 2 for row in convs), [(row.name, row.sparsity) for row in convs]

    model.train()
    digits_task.evaluate(model)
    assert model.training  # evaluate() restores the training flag
