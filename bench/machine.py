"""What a benchmark ran on, recorded in every report: CPU, cores, threads, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info(threads: int) -> dict:
    """CPU model, core counts, the thread count used, the load average at the start and the
    versions of Python, numpy, torch, onnx, onnxruntime and TVM."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    import tvm

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_available": affinity, "threads": threads,
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "platform": platform.platform(), "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "torch": torch.__version__, "numpy": np.__version__, "tvm": tvm.__version__}
