"""compress-and-export, exporters half: ONNX and TVM exporters read the compressor's packed
representation and write deployable artifacts (issues [onnx] and [tvm]; nothing here yet)."""
