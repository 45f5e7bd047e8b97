"""compress-and-export, exporters half: writers of deployable artifacts.

``exporters.onnx.export_onnx``: ONNX for stock ONNX Runtime (fp32 so far); TVM comes with the
[tvm] issue."""
