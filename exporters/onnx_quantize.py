"""int8 ONNX artifacts by ONNX Runtime's quantization tools.

Dynamic (:func:`quantize_int8`, for Linear/recurrent models): weights become symmetric QInt8
(zero point 0, so pruned zeros stay exactly zero; QUInt8 would turn them into the zero point);
activations are quantized at run time.  ONNX Runtime rewrites MatMul/Gemm into
DynamicQuantizeMatMul / MatMulInteger and LSTM into DynamicQuantizeLSTM; it has no int8 GRU
kernel, so GRU operators stay fp32.

Static QDQ (:func:`quantize_static_qdq`, for CNNs): activation ranges are calibrated on sample
inputs (min/max by default) and every quantized tensor ``x`` gets a QuantizeLinear /
DequantizeLinear pair, ``q = saturate(round(x / scale) + zero_point)``,
``x̂ = (q − zero_point) · scale``; weights are stored as int8 with per-output-channel
``scale = max|w| / 127`` and zero point 0 (pruned zeros stay zero), and ONNX Runtime fuses the
pairs into QLinearConv / QGemm kernels when the session is created.  QDQ rather than QOperator:
QOperator with int8 activations is slow on CPU.

Order: prune → finalize → export → quantize → compress (``quantize_dynamic`` refuses a model that
already has compressed initializers).  Both write to a temporary path and rename, so a failure
leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


def quantize_int8(source: str | Path, destination: str | Path, per_channel: bool = True,
                  op_types: Sequence[str] | None = None) -> Path:
    """Write the dynamically quantized (QInt8 weights) version of ``source`` to ``destination``.

    MatMuls inside ``Scan``/``Loop`` bodies are quantized too (``EnableSubgraph``: the recurrent
    MatMul of a GRU lowered by :func:`exporters.onnx_gru.lower_gru`).  ``op_types``: only these
    operator types (e.g. ``["MatMul"]`` to keep convolutions fp32: ONNX Runtime's ConvInteger is
    several times slower than its fp32 Conv); default: every type ``quantize_dynamic`` handles."""
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=list(op_types) if op_types else None,
                         extra_options={"EnableSubgraph": True})
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """Inputs of the graph that are not initializers (old exporters list initializers as inputs)."""
    constants = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    return [i.name for i in model.graph.input if i.name not in constants]


class FeedReader(CalibrationDataReader):
    """Calibration inputs for ``quantize_static``: each item of ``samples`` is a mapping
    ``{input name: array}`` or, for a single-input graph, one array (a CPU ``torch.Tensor`` works
    too); arrays are converted to float32 unless they are integer."""

    def __init__(self, samples: Iterable[Any], input_names: list[str]) -> None:
        self.samples: Iterator[Any] = iter(samples)
        self.input_names = input_names

    def _feed(self, sample: Any) -> dict[str, np.ndarray]:
        if isinstance(sample, Mapping):
            feed = {name: np.asarray(value) for name, value in sample.items()}
        elif len(self.input_names) == 1:
            feed = {self.input_names[0]: np.asarray(sample)}
        else:
            raise ValueError(f"the graph has {len(self.input_names)} inputs ({', '.join(self.input_names)}): "
                             "give each calibration sample as a dict {input name: array}")
        return {name: value if np.issubdtype(value.dtype, np.integer) else value.astype(np.float32)
                for name, value in feed.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        sample = next(self.samples, None)
        return None if sample is None else self._feed(sample)


def quantize_static_qdq(source: str | Path, destination: str | Path, calibration_inputs: Iterable[Any], *,
                        activations: str = "uint8", per_channel: bool = True, preprocess: bool = True,
                        method: CalibrationMethod = CalibrationMethod.MinMax) -> Path:
    """Write the statically quantized QDQ version of ``source`` to ``destination``.

    ``calibration_inputs``: arrays (single-input graphs) or ``{input name: array}`` dicts, for
    example ``ImageTask.calibration_batches(4)``.  Weights are symmetric QInt8 (per output
    channel if ``per_channel``), activations ``"uint8"`` (asymmetric, the CPU default) or
    ``"int8"`` (symmetric).  ``preprocess`` first runs ONNX Runtime's ``quant_pre_process``
    (shape inference and graph optimizations such as BatchNorm folding)."""
    if activations not in ACTIVATION_TYPES:
        raise ValueError(f"activations={activations!r}: use one of {', '.join(ACTIVATION_TYPES)}")
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    input_names = graph_input_names(onnx.load(str(source), load_external_data=False))
    try:
        with tempfile.TemporaryDirectory() as directory:
            model = Path(source)
            if preprocess:
                model = Path(directory) / "preprocessed.onnx"
                quant_pre_process(str(source), str(model))
            quantize_static(str(model), str(tmp), FeedReader(calibration_inputs, input_names),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=ACTIVATION_TYPES[activations], weight_type=QuantType.QInt8,
                            calibrate_method=method,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": activations == "int8"})
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination
