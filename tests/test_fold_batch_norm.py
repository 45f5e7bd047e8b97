"""BatchNorm folded into the convolution before it (exporters.fold_batch_norm) and the row
rescaling of packed weights it uses (PackedWeight.scaled_rows)."""

import numpy as np
import pytest
import torch
from torch import nn

from compressor.blocks import BlockShape
from compressor.packed_model import PackingConfig, pack_model
from compressor.packing import pack
from compressor.zoo import build_model
from exporters.fold_batch_norm import conv_norm_pairs, fold_batch_norms


def front() -> nn.Sequential:
    """DS2's convolution front end, small, with running statistics far from 0 and 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, (5, 3), stride=(2, 1), padding=(2, 1)), nn.BatchNorm2d(8),
                          nn.Hardtanh(0, 20), nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=False))
    for norm in (model[1], model[4]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.2, 3)
    model[1].weight.data.uniform_(-2, 2)  # negative factors too
    model[1].bias.data.uniform_(-1, 1)
    return model.eval()


def test_folded_model_computes_the_same():
    model = front()
    folded, packed = fold_batch_norms(model, {})
    assert packed == {} and isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    x = torch.randn(2, 1, 12, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_packed_int8_weights_keep_their_codes_and_fold_into_their_scales():
    model = front()
    packed = pack_model(model, PackingConfig(format="dense", dtype="int8"))
    folded, weights = fold_batch_norms(packed.dequantized(), packed.weights)
    for name, norm in (("0.weight", model[1]), ("3.weight", model[4])):
        before, after = packed.weights[name], weights[name]
        np.testing.assert_array_equal(after.arrays["values"], before.arrays["values"])
        gamma = norm.weight.detach() if norm.affine else torch.ones(norm.num_features)
        factor = (gamma / torch.sqrt(norm.running_var + norm.eps)).numpy()
        np.testing.assert_allclose(after.arrays["scales"], before.arrays["scales"] * factor, rtol=1e-6)
    # the folded module's weights are what the packed weights store
    np.testing.assert_allclose(folded[0].weight.detach().numpy(), weights["0.weight"].to_dense(), rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 1, 12, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), packed.dequantized()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt,block", [("dense", (1, 1)), ("csr", (1, 1)), ("bsr", (4, 2))])
def test_scaled_rows_multiplies_each_row(fmt, block):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 7)).astype(np.float32) * (rng.random((10, 7)) < 0.4)
    factors = rng.uniform(-2, 2, 10).astype(np.float32)
    for dtype in ("fp32", "int8"):
        weight = pack(w, fmt, BlockShape(*block), dtype=dtype)
        np.testing.assert_allclose(weight.scaled_rows(factors).to_dense(), factors[:, None] * weight.to_dense(),
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one factor per row"):
        weight.scaled_rows(factors[:3])


def test_only_adjacent_pairs_are_folded_with_running_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model[4].train()  # the copy is put in eval mode: its running statistics are used
    folded, _ = fold_batch_norms(model, {})
    assert isinstance(folded[2], nn.BatchNorm2d)  # after a ReLU
    assert isinstance(folded[4], nn.Identity)
    batch_statistics = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert isinstance(fold_batch_norms(batch_statistics, {})[0][1], nn.BatchNorm2d)


def randomized_statistics(model: nn.Module) -> nn.Module:
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.2, 3)
            norm.weight.data.uniform_(-2, 2)
            norm.bias.data.uniform_(-1, 1)
    return model.eval()


def test_resnet_batch_norms_used_as_attributes_are_folded():
    """ResNet blocks call ``bn1(conv1(x))`` in ``forward``: the pairs come from the traced graph."""
    torch.manual_seed(0)
    model = randomized_statistics(build_model("resnet8"))
    pairs = conv_norm_pairs(model)
    assert ("conv", "bn") in pairs and ("stages.1.0.conv2", "stages.1.0.bn2") in pairs
    assert ("stages.1.0.shortcut.0", "stages.1.0.shortcut.1") in pairs and len(pairs) == 9
    folded, _ = fold_batch_norms(model, {})
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


class SharedOutput(nn.Module):
    """The convolution's output is used beside the BatchNorm: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


class CalledTwice(nn.Module):
    """One convolution called twice, once without the BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.conv(x)))


class DataDependent(nn.Module):
    """A forward that ``torch.fx`` cannot trace: only the ``Sequential`` pair is folded."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.norm = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.front(x)
        return self.norm(self.conv(x)) if x.sum() > 0 else x


@pytest.mark.parametrize("model,expected", [(SharedOutput, []), (CalledTwice, []),
                                            (DataDependent, [("front.0", "front.1")])])
def test_pairs_whose_fold_would_change_the_model_are_left(model, expected):
    torch.manual_seed(0)
    model = randomized_statistics(model())
    assert conv_norm_pairs(model) == expected
    folded, _ = fold_batch_norms(model, {})
    x = torch.randn(2, 1 if not isinstance(model, CalledTwice) else 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
