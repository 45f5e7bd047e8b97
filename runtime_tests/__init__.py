"""Runtime tests: artifacts loaded in ONNX Runtime and TVM and compared with PyTorch
(issues [onnx] and [tvm]; collected by pytest from this folder)."""
