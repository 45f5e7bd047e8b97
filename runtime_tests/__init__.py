"""Runtime tests: artifacts loaded in ONNX Runtime (and later TVM) and compared with PyTorch;
collected by pytest from this folder, and callable from the command line
(``python -m runtime_tests.onnxruntime_check``)."""
