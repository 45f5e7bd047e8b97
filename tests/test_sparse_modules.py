"""Sparse reference modules: parity with the masked dense model (fp32) and stated int8 tolerances."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compressor import BlockShape, MagnitudePruner, OneShot, PruneGroup
from compressor.packed_model import PackingConfig, pack_model
from compressor.packing import FORMATS, pack
from compressor.sparse_modules import PackedMatmul, SparseLinear, SparseRecurrent, quantize_activations, swap_sparse_modules
from compressor.zoo import build_model

from .models import Mixed, batch

FP32_RTOL = 1e-5  # the bound, relative to the largest output
INT8_WEIGHT_ONLY_RTOL = 1e-2  # weight-only int8 vs fp32, relative to the largest output
INT8_DYNAMIC_RTOL = 3e-2  # int8 weights + dynamic int8 activations vs fp32


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().abs().max() / expected.detach().abs().max())


def pruned(model: nn.Module, sparsity=0.9, block=BlockShape(1, 1)) -> nn.Module:
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity), block=block)])
    pruner.prepare(model)
    pruner.step()
    return pruner.finalize().eval()


@pytest.mark.parametrize("fmt,block", [("dense", None), ("csr", None), ("coo", None), ("bitmask", BlockShape(4, 4)),
                                       ("bsr", BlockShape(16, 1)), ("bsr", BlockShape(3, 5)), ("bsr", BlockShape(8, 8))])
def test_sparse_linear_matches_masked_dense(fmt, block):
    torch.manual_seed(0)
    linear = pruned(nn.Linear(45, 37), block=block or BlockShape(1, 1))
    packed = pack(linear.weight.detach().numpy(), fmt, block or BlockShape())
    sparse = SparseLinear.from_linear(linear, packed)
    x = torch.randn(3, 5, 45)
    assert relative_error(sparse(x), linear(x)) < FP32_RTOL
    assert sparse(x).shape == (3, 5, 37)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_dynamic_int8_is_exact_integer_arithmetic(fmt):
    torch.manual_seed(1)
    weight = pruned(nn.Linear(64, 48), block=BlockShape(4, 4)).weight.detach().numpy()
    packed = pack(weight, fmt, BlockShape(4, 4), dtype="int8")
    x = torch.randn(7, 64)
    # independent dense reference: int8 codes as a dense matrix, same per-row activation quantization
    codes = torch.from_numpy(pack(weight, "dense", dtype="int8").arrays["values"].astype(np.int32))
    scales = torch.from_numpy(packed.arrays["scales"])
    xq, x_scale = quantize_activations(x)
    expected = (xq @ codes.T).float() * x_scale[:, None] * scales[None, :]
    assert torch.equal(PackedMatmul(packed, "int8")(x), expected)
    fp32 = x @ torch.from_numpy(weight).T
    assert relative_error(PackedMatmul(packed, "int8")(x), fp32) < INT8_DYNAMIC_RTOL
    assert relative_error(PackedMatmul(packed, "fp32")(x), fp32) < INT8_WEIGHT_ONLY_RTOL


@pytest.mark.parametrize("kind", ["RNN_TANH", "RNN_RELU", "GRU", "LSTM"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_sparse_recurrent_matches_torch(kind, batch_first):
    torch.manual_seed(2)
    cls = {"GRU": nn.GRU, "LSTM": nn.LSTM}.get(kind, nn.RNN)
    extra = {"nonlinearity": "relu" if kind == "RNN_RELU" else "tanh"} if cls is nn.RNN else {}
    rnn = pruned(cls(10, 12, num_layers=2, bidirectional=True, batch_first=batch_first, **extra), block=BlockShape(4, 2))
    packed = {name: pack(p.detach().numpy(), "bsr", BlockShape(4, 2)) for name, p in rnn.named_parameters()
              if name.startswith("weight_")}
    sparse = SparseRecurrent(rnn, packed)
    x = torch.randn(3, 6, 10) if batch_first else torch.randn(6, 3, 10)
    expected, expected_state = rnn(x)
    actual, actual_state = sparse(x)
    assert relative_error(actual, expected) < FP32_RTOL
    if kind == "LSTM":
        assert relative_error(actual_state[0], expected_state[0]) < FP32_RTOL
        assert relative_error(actual_state[1], expected_state[1]) < FP32_RTOL
        h0 = (torch.randn(4, 3, 12), torch.randn(4, 3, 12))
    else:
        assert relative_error(actual_state, expected_state) < FP32_RTOL
        h0 = torch.randn(4, 3, 12)
    assert relative_error(sparse(x, h0)[0], rnn(x, h0)[0]) < FP32_RTOL
    unbatched = x[0] if batch_first else x[:, 0]
    assert relative_error(sparse(unbatched)[0], rnn(unbatched)[0]) < FP32_RTOL


def test_swap_whole_model_fp32_and_int8():
    torch.manual_seed(3)
    model = pruned(Mixed(), block=BlockShape(2, 2))
    x, _ = batch(torch.Generator().manual_seed(0))
    expected = model(x)
    fp32 = swap_sparse_modules(pack_model(model))
    assert type(fp32.gru) is SparseRecurrent and type(fp32.fc) is SparseLinear and type(fp32.conv) is nn.Conv2d
    assert relative_error(fp32(x), expected) < FP32_RTOL

    packed_int8 = pack_model(model, PackingConfig(dtype="int8"))
    weight_only = swap_sparse_modules(packed_int8)
    dequantized = copy.deepcopy(model)  # the same model with every packed weight dequantized, computed densely
    with torch.no_grad():
        for name, weight in packed_int8.weights.items():
            dequantized.get_parameter(name).copy_(torch.from_numpy(weight.to_dense()))
    assert relative_error(weight_only(x), dequantized(x)) < FP32_RTOL
    assert relative_error(weight_only(x), expected) < INT8_WEIGHT_ONLY_RTOL
    dynamic = swap_sparse_modules(packed_int8, activations="int8")
    assert relative_error(dynamic(x), expected) < INT8_DYNAMIC_RTOL
    assert "weight" in dict(model.fc.named_parameters())  # the input model is left alone


@pytest.mark.parametrize("shared_input", [True, False])
def test_swap_deep_speech_2(shared_input):
    torch.manual_seed(4)
    model = build_model("ds2", n_freq=64, hidden=48, layers=2, cell="gru", shared_input=shared_input)
    model = pruned(model.eval(), sparsity=0.9, block=BlockShape(16, 1))
    x = torch.randn(2, 1, 64, 30)
    packed = pack_model(model, PackingConfig(format="bsr", block=BlockShape(16, 1)))
    swapped = swap_sparse_modules(packed)
    if shared_input:  # every recurrent weight is an nn.Linear
        assert all(type(m) is SparseLinear for m in swapped.rnns[0].children())
    else:
        assert type(swapped.rnns[0].rnn) is SparseRecurrent
    assert relative_error(swapped(x), model(x)) < FP32_RTOL


def test_int8_activations_need_int8_weights():
    with pytest.raises(ValueError, match="int8 weights"):
        PackedMatmul(pack(np.ones((2, 2), np.float32), "csr"), "int8")
    assert set(FORMATS) == {"dense", "csr", "bsr", "coo", "bitmask"}
