"""The int8-activation kernel (exporters.tvm_vnni_kernel) and ``export_tvm(activations="int8")``.

Exactness: on inputs that are exact multiples of a power of two with one element at ±127 of
them, the quantization is exact (``s_x`` is that power of two), so the kernel must give the
integer product ``s_x · scales[n] · Σ q·x̂`` up to the fp32 rounding of the final scaling
(checked within 1e-6 relative).  On normal inputs each output stays within the rounding bound
``s_x / 2 · Σ_k |w[n, k]|`` of the product with the dequantized weight.  The recurrence with a
quantized state matches a float64 GRU that rounds ``h`` the same way.  The kernels run only
on a CPU with AVX-512 VNNI; elsewhere those tests are skipped and the refusals still run."""

import numpy as np
import pytest
import torch
import tvm

from compressor.blocks import BlockShape
from compressor.packed_model import PackingConfig, pack_model
from compressor.packing import pack
from exporters.tvm import export_tvm
from exporters.tvm_kernels import host_target, matmul_kernel
from exporters.tvm_recurrence_kernel import recurrence_kernel
from exporters.tvm_vnni_kernel import (MIN_ROWS, target_has_vnni, takes_int8_activations, vnni_layout,
                                       vnni_matmul_call)
from runtime_tests.models import pruned
from runtime_tests.test_tvm_kernels import DYN_ROWS, pruned_weight, run_kernel
from runtime_tests.test_tvm_recurrence import HIDDEN, Recurrent
from runtime_tests.tvm_check import compare_with_torch, run_tvm

needs_vnni = pytest.mark.skipif(not target_has_vnni(host_target()), reason="this CPU has no AVX-512 VNNI")
BLOCK = BlockShape(16, 1)
SHAPES = [(50, 71), (64, 1760), (37, 3)]  # N and K that 16 and 4 do not divide, a wide K, K below 4


def packed_int8(shape, seed, zeros=0.85):
    return pack(pruned_weight(shape, BLOCK, seed, zeros), "bsr", BLOCK, dtype="int8")


def exact_input(rows: int, k: int, seed: int, step: float = 2.0**-5) -> tuple[np.ndarray, np.ndarray]:
    """``x = codes · step`` with integer codes in [-127, 127] and one at 127: quantized exactly."""
    codes = np.random.default_rng(seed).integers(-127, 128, size=(rows, k))
    codes.flat[seed % codes.size] = 127
    return (codes * step).astype(np.float32), codes


def integer_reference(weight, codes: np.ndarray, step: float) -> np.ndarray:
    q = weight.stored_matrix().astype(np.int64)  # stored int8 codes in place
    sums = (codes @ q.T).astype(np.float32)
    return sums * (weight.arrays["scales"].astype(np.float32) * np.float32(step))[None, :]


def test_layout_holds_every_stored_block_once():
    weight = packed_int8((50, 71), seed=1)
    tiles, columns, group_ptr, correction, scales = vnni_layout(weight)
    q = weight.stored_matrix().astype(np.int64)
    rebuilt = np.zeros((64, 71), np.int64)  # 4 block rows of 16
    for i in range(4):
        for g in range(group_ptr[i], group_ptr[i + 1]):
            tile = tiles[g].reshape(16, 4)
            for t in range(4):
                rebuilt[16 * i:16 * i + 16, columns[g, t]] += tile[:, t]
    assert np.array_equal(rebuilt[:50], q) and not rebuilt[50:].any()
    assert np.array_equal(correction[:50], 128 * q.sum(1)) and not correction[50:].any()
    assert np.array_equal(scales[:50], weight.arrays["scales"]) and (scales[50:] == 1).all()
    counts = np.diff(weight.arrays["indptr"].astype(np.int64))
    assert np.array_equal(np.diff(group_ptr), -(-counts // 4))  # 4 blocks a group, the first block row empty


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("batch", [MIN_ROWS, 16, None])
@needs_vnni
def test_kernel_is_exact_on_exactly_quantized_inputs(shape, batch):
    weight = packed_int8(shape, seed=2)
    call = vnni_matmul_call(weight, batch)
    module = tvm.compile(call.func, target=host_target())
    for rows in (DYN_ROWS if batch is None else (batch,)):
        x, codes = exact_input(rows, shape[1], seed=rows)
        y = run_kernel(call, x, module)
        reference = integer_reference(weight, codes, 2.0**-5)
        assert np.allclose(y, reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max()), rows


@pytest.mark.parametrize("batch", [16, None])
@needs_vnni
def test_kernel_stays_within_the_rounding_bound(batch):
    weight = packed_int8((96, 300), seed=3, zeros=0.7)
    call = vnni_matmul_call(weight, batch)
    x = (np.random.default_rng(4).standard_normal((16 if batch else 40, 300)) * 3).astype(np.float32)
    y = run_kernel(call, x)
    dequantized = weight.to_dense()
    error = np.abs(y - x @ dequantized.T)
    bound = np.abs(dequantized).sum(1) * (np.abs(x).max() / 127) / 2
    assert (error <= bound[None, :] * (1 + 1e-4) + 1e-5).all()
    assert error.max() > 0  # the activations really are quantized


def test_only_16x1_int8_weights_are_taken():
    weights = {"csr": pack(pruned_weight((32, 40), BlockShape(), 5), "csr", dtype="int8"),
               "bsr4x4": pack(pruned_weight((32, 40), BlockShape(4, 4), 5), "bsr", BlockShape(4, 4), dtype="int8"),
               "bsr16x1 fp32": pack(pruned_weight((32, 40), BLOCK, 5), "bsr", BLOCK)}
    for weight in weights.values():
        assert not takes_int8_activations(weight)
        with pytest.raises(ValueError, match="pack with block 16x1 and dtype int8"):
            vnni_layout(weight)
    assert takes_int8_activations(packed_int8((32, 40), 5))


class Stack(torch.nn.Module):
    """Two linear layers and a GRU: its input projection is a matmul over all time steps."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(48, 64)
        self.gru = torch.nn.GRU(64, 32, batch_first=True)
        self.out = torch.nn.Linear(32, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(torch.relu(self.inp(x)))[0])


@needs_vnni
def test_export_with_int8_activations_runs_vnni_kernels(tmp_path):
    torch.manual_seed(0)
    model = pruned(Stack().eval(), BLOCK).eval()
    packed = pack_model(model, PackingConfig(format="bsr", block=BLOCK, dtype="int8"))
    example = torch.randn(2, 9, 48)
    artifact = export_tvm(packed, (example,), tmp_path / "stack.so", activations="int8")
    plain = export_tvm(packed, (example,), tmp_path / "plain.so")
    vnni = {use.weight for use in artifact.kernels if "vnni" in use.kernel}
    assert vnni == {"inp.weight", "out.weight", "gru.weight_ih_l0"}  # 18 rows each; W_hh stays a recurrence
    assert not any("vnni" in use.kernel for use in plain.kernels)
    with torch.no_grad():
        reference = packed.dequantized()(example).numpy()
    y, y_plain = run_tvm(artifact.path, [example.numpy()])[0], run_tvm(plain.path, [example.numpy()])[0]
    assert np.abs(y_plain - reference).max() < 1e-4 * np.abs(reference).max()
    error = np.abs(y - reference).max() / np.abs(reference).max()
    assert 0 < error < 2e-2  # three quantized activations: about ONNX Runtime's dynamic quantization error


def test_int8_activations_are_refused_where_they_cannot_run(tmp_path):
    model = pruned(Stack().eval(), BLOCK).eval()
    packed = pack_model(model, PackingConfig(format="bsr", block=BLOCK, dtype="int8"))
    with pytest.raises(ValueError, match="needs an x86 CPU with AVX-512 VNNI"):
        export_tvm(packed, (torch.randn(1, 5, 48),), tmp_path / "m.so", target="aarch64-linux", activations="int8")
    assert not (tmp_path / "m.so").exists()
    with pytest.raises(ValueError, match="unknown activations 'int4': use fp32 or int8"):
        export_tvm(packed, (torch.randn(1, 5, 48),), tmp_path / "m.so", activations="int4")


@needs_vnni
def test_small_batches_keep_the_fp32_activation_kernel(tmp_path):
    model = pruned(Stack().eval(), BLOCK).eval()
    packed = pack_model(model, PackingConfig(format="bsr", block=BLOCK, dtype="int8"))
    artifact = export_tvm(packed, (torch.randn(1, 1, 48),), tmp_path / "one.so", activations="int8")
    assert not any("vnni" in use.kernel for use in artifact.kernels)  # 1 row: below MIN_ROWS
    assert matmul_kernel(packed.weights["inp.weight"], 1).name.startswith("bsr16x1_int8")


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


def gru_reference(gi: np.ndarray, h0: np.ndarray, w_hh: np.ndarray, b_hh: np.ndarray, round_state: bool) -> np.ndarray:
    """A GRU direction in float64; with ``round_state`` it multiplies ``W_hh`` with ``h`` rounded as
    the kernel rounds it: ``ĥ = ⌊h / s_h + ½⌋ · s_h``, ``s_h = max|h| / 127`` over the batch."""
    hidden = h0.shape[1]
    h, ys = h0.astype(np.float64), []
    for step in gi.astype(np.float64):
        scale = np.float32(np.abs(h).max()) / np.float32(127)
        state = np.floor(h.astype(np.float32) * (np.float32(1) / scale) + 0.5) * scale if round_state else h
        gh = state @ w_hh.T + b_hh
        r = _sigmoid(step[:, :hidden] + gh[:, :hidden])
        z = _sigmoid(step[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
        n = np.tanh(step[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
        h = (1 - z) * n + z * h
        ys.append(h)
    return np.stack(ys)


@pytest.mark.parametrize("batch", [MIN_ROWS, 20])  # one tile of 16 samples, and two (the second partial)
@needs_vnni
def test_recurrence_kernel_multiplies_the_rounded_state(batch):
    """The int8-activation recurrence against a float64 GRU that rounds ``h`` the same way: the
    only difference left is fp32 arithmetic (the rounding of ``h`` itself is about 100× larger)."""
    hidden, steps = 48, 9
    weight = packed_int8((3 * hidden, hidden), seed=6, zeros=0.6)
    kernel = recurrence_kernel("gru", weight, batch, reverse=False, activations="int8")
    assert kernel.name == f"recurrence_gru_bsr16x1_int8_u8_b{batch}_h{hidden}_forward_vnni"
    rng = np.random.default_rng(7)
    gi = rng.standard_normal((steps, batch, 3 * hidden)).astype(np.float32)
    h0 = (rng.standard_normal((1, batch, hidden)) * 0.8).astype(np.float32)
    b_hh = rng.standard_normal(3 * hidden).astype(np.float32)
    module = tvm.compile(kernel.func, target=host_target())
    device = tvm.cpu()
    args = [gi, h0, *kernel.constants, b_hh]
    outputs = [np.zeros((steps, batch, hidden), np.float32), np.zeros((1, batch, hidden), np.float32)]
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in args + outputs]
    module[kernel.name](*tensors)
    y, final = tensors[-2].numpy(), tensors[-1].numpy()
    w_hh = weight.to_dense().astype(np.float64)
    emulated = gru_reference(gi, h0[0], w_hh, b_hh, round_state=True)
    exact = gru_reference(gi, h0[0], w_hh, b_hh, round_state=False)
    assert np.abs(y - emulated).max() < 1e-4
    assert np.array_equal(final[0], y[-1])
    assert np.abs(emulated - exact).max() > 1e-3


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("batch", [MIN_ROWS, 20])
@needs_vnni
def test_export_runs_recurrences_with_int8_activations(cell, batch, tmp_path):
    torch.manual_seed(0)
    model = pruned(Recurrent(cell).eval(), BLOCK)
    packed = pack_model(model, PackingConfig(format="bsr", block=BLOCK, dtype="int8"))
    example = torch.randn(batch, 11, 8)
    artifact = export_tvm(packed, (example,), tmp_path / "rnn.so", activations="int8")
    recurrent = sorted(use.kernel for use in artifact.kernels if "weight_hh" in use.weight)
    assert recurrent == [f"recurrence_{cell}_bsr16x1_int8_u8_b{batch}_h{HIDDEN}_{direction}_vnni"
                         for direction in ("forward", "reverse")]
    # W_ih, W_hh and their inputs quantized: within ONNX Runtime's int8 GRU error (measured 4e-3 to 8e-3)
    assert 0 < compare_with_torch(packed.dequantized(), artifact.path, (example,)).worst < 2e-2


def test_small_batches_and_other_packings_keep_an_fp32_state():
    torch.manual_seed(0)
    model = pruned(Recurrent("rnn_tanh").eval(), BLOCK)
    packed = pack_model(model, PackingConfig(format="bsr", block=BLOCK, dtype="int8"))
    weight = packed.weights["rnn.weight_hh_l0"]
    fp32 = pack(weight.to_dense(), "bsr", BLOCK)
    assert not recurrence_kernel("rnn_tanh", fp32, MIN_ROWS, False, "int8").name.endswith("vnni")
    assert not recurrence_kernel("rnn_tanh", weight, MIN_ROWS - 1, False, "int8").name.endswith("vnni")
    assert recurrence_kernel("rnn_tanh", weight, MIN_ROWS, False, "int8").name.endswith("vnni")
