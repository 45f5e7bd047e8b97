"""int8 ONNX artifacts by ONNX Runtime's dynamic quantization.

Weights become symmetric QInt8 (zero point 0, so pruned zeros stay exactly zero; QUInt8 would
turn them into the zero point); activations are quantized at run time.  ONNX Runtime rewrites
MatMul/Gemm into DynamicQuantizeMatMul / MatMulInteger and LSTM into DynamicQuantizeLSTM; it has
no int8 GRU kernel, so GRU operators stay fp32.  Order: prune → finalize → export → quantize →
compress (``quantize_dynamic`` refuses a model that already has compressed initializers).
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic


def quantize_int8(source: str | Path, destination: str | Path, per_channel: bool = True) -> Path:
    """Write the dynamically quantized (QInt8 weights) version of ``source`` to ``destination``."""
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel)
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination
