"""Image classification on data that is already on the machine, nothing downloaded.

* ``fashion-mnist``: Fashion-MNIST (Xiao, Rasul and Vollgraf 2017), 60,000 training and 10,000
  test images of 28×28 grey-scale clothing in 10 classes, read from the gzipped IDX files that
  Debian's ``dataset-fashion-mnist`` package installs in ``/usr/share/datasets/fashion-mnist``.
* ``digits``: scikit-learn's bundled copy of the UCI optical digits (Alpaydin and Kaynak 1998),
  1,797 8×8 images with values 0–16; a fixed seeded permutation puts the last 20 % in ``test``.

Images are normalized with the training set's mean μ and standard deviation σ,
``x = (pixel − μ) / σ``, and given to the model as ``float32 [batch, 1, H, W]``; the loss is
cross-entropy over the 10 classes and the metric is accuracy.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

#: IDX element types by the third byte of the magic number (all multi-byte types big-endian).
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def parse_idx(data: bytes) -> np.ndarray:
    """An array from the bytes of an IDX file (LeCun et al.'s MNIST format).

    Header: two zero bytes, a type byte (:data:`IDX_DTYPES`), the number of dimensions d, then
    d big-endian uint32 sizes; the body is the ``∏ sizes`` elements in C order."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"not an IDX file (magic number {data[:4].hex() or 'missing'})")
    dtype, ndim = IDX_DTYPES[data[2]], data[3]
    body = 4 + 4 * ndim
    if len(data) < body:
        raise ValueError(f"IDX header truncated: {ndim} dimensions need {body} bytes, the file has {len(data)}")
    shape = tuple(int(size) for size in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - body != expected:
        raise ValueError(f"IDX body of shape {shape} needs {expected} bytes, the file has {len(data) - body}")
    return np.frombuffer(data, dtype, offset=body).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx_gz(path: Path) -> np.ndarray:
    """A gzipped IDX file; any damage is a ``ValueError`` naming the file."""
    try:
        with gzip.open(path) as f:
            return parse_idx(f.read())
    except (gzip.BadGzipFile, EOFError, ValueError) as error:
        raise ValueError(f"{path.name}: {error}") from error


def _read_fashion_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (root / name for name in FASHION_MNIST_FILES[split])
    images, labels = read_idx_gz(image_file), read_idx_gz(label_file)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{image_file.name} holds {images.dtype} {images.shape}, not uint8 [N, 28, 28]")
    if labels.ndim != 1 or len(labels) != len(images) or not np.isin(labels, range(10)).all():
        raise ValueError(f"{label_file.name} does not hold {len(images)} labels in 0..9")
    return images, labels.astype(np.int64)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT) -> Splits:
    """``{"train": (images uint8 [60000, 28, 28], labels int64), "test": (… [10000, 28, 28], …)}``."""
    root = Path(root)
    try:
        return {split: _read_fashion_split(root, split) for split in FASHION_MNIST_FILES}
    except FileNotFoundError as error:
        problem = f"{Path(error.filename).name} is missing"
    except (OSError, ValueError) as error:
        problem = str(error)
    raise RuntimeError(f"Fashion-MNIST not usable in {root} ({problem}): install it with "
                       "`apt-get install dataset-fashion-mnist` (or run scripts/setup.sh)")


def load_sklearn_digits(seed: int = 0, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's 8×8 digits as ``{"train": (uint8 [1438, 8, 8], int64), "test": (… [359, 8, 8], …)}``:
    the last ``round(test_fraction·1797)`` images of a permutation drawn with ``seed`` are the test set."""
    from sklearn.datasets import load_digits  # imported here: sklearn takes a second to import

    digits = load_digits()
    images, labels = digits.images.astype(np.uint8), digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = len(images) - int(round(test_fraction * len(images)))
    return {"train": (images[order[:cut]], labels[order[:cut]]),
            "test": (images[order[cut:]], labels[order[cut:]])}


DATASETS: dict[str, Callable[[], Splits]] = {"fashion-mnist": load_fashion_mnist, "digits": load_sklearn_digits}


class ImageTask:
    """10-class image classification as a :class:`~compressor.tasks.base.Task`.

    The model maps ``float32 [b, 1, H, W]`` to logits ``[b, 10]``.  Training batches are
    ``(images, labels)`` of ``batch_size`` indices drawn uniformly with replacement from the
    training set, so each batch depends on the generator's state alone.  ``eval_limit`` evaluates
    on the first images of a split only."""

    metric = "accuracy"
    higher_is_better = True
    num_classes = 10

    def __init__(self, dataset: str = "fashion-mnist", batch_size: int = 128, eval_limit: int | None = None) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown image dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
        self.name, self.batch_size, self.eval_limit = dataset, batch_size, eval_limit
        splits = DATASETS[dataset]()
        train = splits["train"][0].astype(np.float32)
        self.mean, self.std = float(train.mean()), float(train.std())
        self.images = {split: torch.from_numpy((x.astype(np.float32) - self.mean) / self.std).unsqueeze(1)
                       for split, (x, _) in splits.items()}
        self.labels = {split: torch.from_numpy(y) for split, (_, y) in splits.items()}

    def batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.images["train"], self.labels["train"]
        while True:
            index = torch.randint(len(images), (self.batch_size,), generator=generator)
            yield images[index], labels[index]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        """Accuracy and mean cross-entropy over ``split`` (batches of 512, eval mode)."""
        images, labels = self.images[split], self.labels[split]
        count = len(images) if self.eval_limit is None else min(len(images), self.eval_limit)
        was_training = model.training
        model.eval()
        correct, total_loss = 0, 0.0
        for start in range(0, count, 512):
            logits = model(images[start:min(start + 512, count)])
            target = labels[start:min(start + 512, count)]
            correct += int((logits.argmax(-1) == target).sum())
            total_loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        model.train(was_training)
        return {"accuracy": correct / count, "loss": total_loss / count}

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        """The first ``n`` consecutive ``batch_size`` slices of the (normalized) training images,
        for calibrating static quantization; no randomness involved."""
        images = self.images["train"]
        if n * self.batch_size > len(images):
            raise ValueError(f"{n} calibration batches of {self.batch_size} exceed the {len(images)} training images")
        return [images[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]
