"""Task accuracy through TVM libraries: the shipped checkpoints evaluated by the tasks' own
``evaluate`` on a :class:`TvmModule`, against the same evaluation in PyTorch.

Fixed subsets: the first 1000 Fashion-MNIST test images (batch-1 library, images run one by
one), the first 100 test utterances of the speech-digits corpus (batch-1 library with a run-time
time axis).  Tolerance: within 0.1 percentage points of PyTorch — for int8, of the PyTorch model
carrying the stored int8 weights (``PackedModel.dequantized()``), since the kernels compute
exactly with them.
"""

import pytest

from compressor.packed_model import PackingConfig, pack_model
from compressor.tasks.images import ImageTask
from compressor.zoo.pretrained import load_pretrained
from exporters.tvm import export_tvm
from runtime_tests.models import pruned
from runtime_tests.tvm_check import TvmModule

DELTA = 0.001


@pytest.fixture(scope="module")
def images() -> ImageTask:
    return ImageTask("fashion-mnist", batch_size=128, eval_limit=1000)


@pytest.fixture(scope="module")
def speech():
    from compressor.tasks.speech import SpeechCorpusSpec, SpeechTask

    spec = SpeechCorpusSpec(kind="digits", train_size=4000, test_size=400, flite_size=200)  # the checkpoint's
    return SpeechTask(spec, progress=False, eval_limit=100)


@pytest.mark.parametrize("kind", ["dense-fp32", "pruned-int8"])
def test_resnet8_accuracy_through_tvm(images, kind, tmp_path):
    model = load_pretrained("resnet8-fashion-mnist")
    if kind == "pruned-int8":
        model = pack_model(pruned(model, sparsity=0.5), PackingConfig(dtype="int8"))
    reference = model.dequantized() if kind == "pruned-int8" else model
    artifact = export_tvm(model, (images.images["test"][:1],), tmp_path / "resnet8.so")
    expected = images.evaluate(reference)["accuracy"]
    got = images.evaluate(TvmModule(artifact.path, batch=1))["accuracy"]
    assert abs(got - expected) <= DELTA, (got, expected)
    assert expected > (0.9 if kind == "dense-fp32" else 0.5)


def test_ds2_mini_cer_through_tvm(speech, tmp_path):
    from compressor.tasks.speech import collate

    model = load_pretrained("ds2-mini-digits")
    packed = pack_model(pruned(model, sparsity=0.5), PackingConfig(dtype="int8"))
    reference = packed.dequantized().eval()
    example = collate(speech.corpus["test"], [0])["features"]
    artifact = export_tvm(packed, (example,), tmp_path / "ds2.so", dynamic_axes={0: [3]})
    expected = speech.evaluate(reference)["cer"]
    got = speech.evaluate(TvmModule(artifact.path, batch=1, output_lengths=reference.output_lengths))["cer"]
    assert abs(got - expected) <= DELTA, (got, expected)
    assert expected < 0.1
