"""bench.taylor at a tiny size: every stage runs, lands in the run log, and a resumed run
recomputes nothing."""

from dataclasses import replace

import pytest

from bench import taylor
from bench.runlog import RunLog

TINY = replace(taylor.QUICK, oracle_batches=1, image_batch=16, image_every=2, image_per_prune=64, image_target=0.6,
               image_steps=4, image_eval_limit=64, latency_runs=3, hessian_probes=1)


def test_images_task_resumes_from_its_run_log(tmp_path, monkeypatch):
    path = tmp_path / "taylor.runs.json"
    first = taylor.run_task("images", TINY, RunLog(path))
    assert set(RunLog(path).runs) == {"images/dense (evaluation subset)", "images/correlation",
                                      "images/dense (full test split)",
                                      *(f"images/curve/{label}" for label in taylor.CURVE_METHODS)}
    assert set(first["latency"]) == {"dense", "Taylor FO (shrunk)"} and "latency" not in first["curves"]["Taylor FO"]
    shrunk = first["latency"]["Taylor FO (shrunk)"]
    assert shrunk["params"] == first["curves"]["Taylor FO"]["final"]["params"] < first["latency"]["dense"]["params"]
    assert shrunk["onnx_ms"] > 0 and shrunk["tvm_ms"] > 0
    for name in ("correlation_experiment", "curve_experiment", "latency_experiment"):
        monkeypatch.setattr(taylor, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran again"))
    assert "latency" in RunLog(path).runs["images/curve/Taylor FO"]
    again = taylor.run_task("images", TINY, RunLog(path))
    assert again["latency"] == first["latency"] and again["correlation"]["rows"] == first["correlation"]["rows"]
    assert again["curves"]["random"]["final"] == first["curves"]["random"]["final"]
