"""Task accuracy through ONNX Runtime: the shipped checkpoints evaluated by the tasks' own
``evaluate`` on an :class:`OnnxModule`, against the same evaluation in PyTorch.

Fixed subsets: the first 2000 Fashion-MNIST test images, the first 200 test utterances of the
speech-digits corpus.  Tolerances: fp32 ONNX within 0.1 percentage points of PyTorch (accuracy
and CER; measured: identical); static QDQ int8 within 1 point of fp32 accuracy (3 points for the
90 % pruned, not fine-tuned ResNet-8); dynamic int8 CER within 0.5 points of fp32.
"""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor import MagnitudePruner, OneShot, PruneGroup
from compressor.tasks.images import ImageTask
from compressor.zoo.pretrained import load_pretrained
from exporters.onnx import export_onnx
from exporters.onnx_compress import compress_file
from exporters.onnx_quantize import quantize_int8, quantize_static_qdq
from runtime_tests.onnxruntime_check import evaluate_onnx

FP32_DELTA = 0.001  # 0.1 percentage points: 2 of 2000 images
QDQ_DELTA = {"dense": 0.01,  # static int8 accuracy vs fp32
             "pruned": 0.03}  # one-shot 90 % without fine-tuning (~38 %): many predictions sit on a knife edge
DYNAMIC_CER_DELTA = 0.005  # dynamic int8 CER vs fp32
IMAGES, UTTERANCES, CALIBRATION_BATCHES = 2000, 200, 4


@pytest.fixture(scope="module")
def images() -> ImageTask:
    torch.set_num_threads(1)
    return ImageTask("fashion-mnist", batch_size=128, eval_limit=IMAGES)


@pytest.fixture(scope="module")
def speech():
    from compressor.tasks.speech import SpeechCorpusSpec, SpeechTask

    spec = SpeechCorpusSpec(kind="digits", train_size=4000, test_size=400, flite_size=200)  # the checkpoint's
    return SpeechTask(spec, progress=False, eval_limit=UTTERANCES)


def pruned_resnet8(task: ImageTask) -> nn.Module:
    """ResNet-8 with 90 % of its conv and linear weights pruned in one shot (one global magnitude
    ranking), then BatchNorm statistics re-estimated on 10 training batches (no gradient step)."""
    model = load_pretrained("resnet8-fashion-mnist")
    pruner = MagnitudePruner([PruneGroup(OneShot(0.9), ranking="global")])
    pruner.prepare(model)
    pruner.step()
    model = pruner.finalize()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in task.calibration_batches(10):
            model(batch)
    return model.eval()


def export_resnet8(model: nn.Module, path: Path) -> Path:
    return export_onnx(model, (torch.randn(1, 1, 28, 28),), path).path


@pytest.mark.parametrize("kind", ["dense", "pruned"])
def test_resnet8_fp32_onnx_accuracy_equals_pytorch(kind, images, tmp_path):
    model = load_pretrained("resnet8-fashion-mnist") if kind == "dense" else pruned_resnet8(images)
    path = export_resnet8(model, tmp_path / "fp32.onnx")
    expected = images.evaluate(model)["accuracy"]
    assert evaluate_onnx(path, images, threads=1)["accuracy"] == pytest.approx(expected, abs=FP32_DELTA)
    if kind == "pruned":  # compressed at rest: same file contents once loaded
        compress_file(path, tmp_path / "fp32.compressed.onnx", min_numel=256)
        accuracy = evaluate_onnx(tmp_path / "fp32.compressed.onnx", images, threads=1)["accuracy"]
        assert accuracy == pytest.approx(expected, abs=FP32_DELTA)
    else:
        assert expected > 0.9


def _weight_zeros(path) -> float:
    """Fraction of zeros over the conv/linear weights (initializers of two or more dimensions)."""
    arrays = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    weights = [a for a in arrays if a.ndim >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


@pytest.mark.parametrize("kind", ["dense", "pruned"])
def test_resnet8_static_qdq_int8_accuracy_and_size(kind, images, tmp_path):
    model = load_pretrained("resnet8-fashion-mnist") if kind == "dense" else pruned_resnet8(images)
    fp32 = export_resnet8(model, tmp_path / "fp32.onnx")
    int8 = quantize_static_qdq(fp32, tmp_path / "int8.onnx", images.calibration_batches(CALIBRATION_BATCHES))
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp32_accuracy = evaluate_onnx(fp32, images, threads=1)["accuracy"]
    int8_accuracy = evaluate_onnx(int8, images, threads=1)["accuracy"]
    assert int8_accuracy == pytest.approx(fp32_accuracy, abs=QDQ_DELTA[kind])
    stored = {path: sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)
              for path in (fp32, int8)}
    assert stored[fp32] / stored[int8] > 3.5  # arrays only, as compressor.size counts
    if kind == "dense":  # the file: ~22 kB of QDQ node and tensor names on top of 83 kB of arrays
        assert fp32.stat().st_size / int8.stat().st_size > 2.9
    else:  # symmetric int8 keeps the pruned zeros; compressed at rest on top
        assert _weight_zeros(int8) >= _weight_zeros(fp32) > 0.89
        report = compress_file(int8, tmp_path / "int8.compressed.onnx", min_numel=256)
        assert report and all(r.stored_bytes < r.dense_bytes for r in report)
        compressed = tmp_path / "int8.compressed.onnx"
        assert fp32.stat().st_size / compressed.stat().st_size > 4.5
        assert evaluate_onnx(compressed, images, threads=1)["accuracy"] == int8_accuracy


def test_ds2_mini_fp32_and_dynamic_int8_cer(speech, tmp_path):
    torch.set_num_threads(1)
    model = load_pretrained("ds2-mini-digits")
    axes = {"input": {0: "batch", 3: "time"}, "output": {0: "batch", 1: "time"}}
    fp32 = export_onnx(model, (torch.randn(1, 1, 64, 50),), tmp_path / "fp32.onnx", dynamic_axes=axes).path
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx")
    expected = speech.evaluate(model)
    onnx_fp32 = evaluate_onnx(fp32, speech, threads=1, output_lengths=model.output_lengths)
    onnx_int8 = evaluate_onnx(int8, speech, threads=1, output_lengths=model.output_lengths)
    assert expected["cer"] < 0.05
    assert onnx_fp32["cer"] == pytest.approx(expected["cer"], abs=FP32_DELTA)
    assert onnx_fp32["wer"] == pytest.approx(expected["wer"], abs=0.005)
    assert onnx_int8["cer"] == pytest.approx(onnx_fp32["cer"], abs=DYNAMIC_CER_DELTA)
    assert np.isfinite(onnx_int8["wer"])
