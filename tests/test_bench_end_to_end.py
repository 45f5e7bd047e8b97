"""The end-to-end benchmark's accuracy phase on a few test examples (the task metric of every
backend is checked against PyTorch, never for speed), and its tables with the task metric."""

import pytest

from bench.end_to_end import (
    FINETUNE_STEPS,
    HEADER,
    PRUNING,
    SPARSITY,
    add_accuracy,
    make_task,
    measure_accuracy,
    prepare,
    specs,
    table_rows,
    to_markdown,
)
from exporters.tvm_kernels import host_target
from exporters.tvm_vnni_kernel import target_has_vnni

INT8_ACTIVATIONS = "tvm sparse int8, int8 activations"  # only on a CPU with AVX-512 VNNI
BACKENDS = ["pytorch eager dense", "onnx runtime fp32 dense", "onnx runtime int8 dense", "tvm dense fp32",
            "tvm sparse fp32", "tvm sparse int8"] + ([INT8_ACTIVATIONS] if target_has_vnni(host_target()) else [])


def spec_of(task: str):
    [spec] = [s for s in specs(quick=True) if s.task == task]
    return spec


def check_against_pytorch(accuracy: dict, metric: str, tolerance: float) -> None:
    rows, reference = accuracy["rows"], accuracy["reference"]
    assert list(rows) == BACKENDS
    assert list(reference) == ["pytorch eager sparse fp32", "pytorch eager sparse int8 (stored weights)"]
    dense = rows["pytorch eager dense"][metric]
    for name in ("onnx runtime fp32 dense", "tvm dense fp32"):
        assert rows[name][metric] == pytest.approx(dense, abs=tolerance)
    assert rows["tvm sparse fp32"][metric] == pytest.approx(reference["pytorch eager sparse fp32"][metric], abs=tolerance)
    assert rows["tvm sparse int8"][metric] == pytest.approx(
        reference["pytorch eager sparse int8 (stored weights)"][metric], abs=tolerance)
    if INT8_ACTIVATIONS in rows:  # quantized inputs of the large matmuls: a little more than one tie
        assert rows[INT8_ACTIVATIONS][metric] == pytest.approx(
            reference["pytorch eager sparse int8 (stored weights)"][metric], abs=tolerance + 0.02)



def measured(task_name: str, examples: int, steps: int, tmp_path) -> dict:
    """The accuracy phase after ``steps`` steps of gradual pruning while fine-tuning."""
    spec, task = spec_of(task_name), make_task(task_name, examples)
    prepared = prepare(spec, task, steps)
    sparse = prepared[1]
    pruned = [m.weight for m in sparse.modules() if hasattr(m, "weight") and m.weight is not None
              and m.weight.dim() > 1 and (m.weight == 0).float().mean() > 0.5]
    assert pruned and all((w == 0).float().mean() == pytest.approx(SPARSITY, abs=0.02) for w in pruned)
    accuracy = measure_accuracy(spec, prepared, task, 1, tmp_path, False, PRUNING.format(steps=steps))
    assert "gradually" in accuracy["pruning"] and f"{steps} fine-tuning steps" in accuracy["pruning"]
    return accuracy


def test_accuracy_phase_resnet8(tmp_path):
    accuracy = measured("fashion-mnist", 64, 30, tmp_path)
    assert (accuracy["task"], accuracy["metric"], accuracy["examples"]) == ("fashion-mnist", "accuracy", 64)
    assert accuracy["rows"]["pytorch eager dense"]["accuracy"] > 0.75  # the shipped checkpoint
    check_against_pytorch(accuracy, "accuracy", 1 / 64 + 1e-9)  # one image may flip on a tie


@pytest.mark.slow
def test_accuracy_phase_ds2_mini_every_utterance_length(tmp_path):
    accuracy = measured("speech-digits", 12, FINETUNE_STEPS[True] // 10, tmp_path)
    assert (accuracy["task"], accuracy["metric"], accuracy["examples"]) == ("speech-digits", "cer", 12)
    assert accuracy["time_axis"].startswith("run-time")
    assert accuracy["rows"]["pytorch eager dense"]["cer"] < 0.1
    check_against_pytorch(accuracy, "cer", 0.01)


def timed_model(name: str) -> dict:
    row = {"latency_ms": {1: 2.0, 16: 8.0}, "size_bytes": 1_000_000, "speedup_vs_onnx_fp32": {1: 1.5, 16: 1.0},
           "speedup_vs_onnx_int8": {1: 1.0, 16: 0.5}}
    return {"model": name, "sparsity": 0.9, "block": "16x1", "rows": {b: dict(row, latency_ms=dict(row["latency_ms"]))
                                                                      for b in BACKENDS}}


def test_tables_show_the_task_metric():
    untrained, mini = timed_model("ds2 (3×1760)"), timed_model("ds2-mini (digits)")
    add_accuracy(mini, {"task": "speech-digits", "metric": "cer", "examples": 200, "pruning": "one-shot",
                        "rows": {b: {"cer": 0.0137 if "dense" in b else 0.797, "wer": 0.5} for b in BACKENDS},
                        "reference": {"pytorch eager sparse fp32": {"cer": 0.794, "wer": 1.0}}})
    assert mini["rows"]["tvm sparse int8"]["accuracy"] == {"cer": 0.797, "wer": 0.5}
    assert mini["accuracy"]["examples"] == 200 and "rows" not in mini["accuracy"]
    result = {"machine": {"cpu": "Test CPU", "threads": 1, "tvm": "0.27", "onnxruntime": "1.32", "torch": "2.13"},
              "quick": True, "models": [untrained, mini]}
    rows = table_rows(result)
    assert HEADER[-1] == "task metric" and all(len(r) == len(HEADER) for r in rows)
    assert [r[-1] for r in rows if r[0] == "ds2 (3×1760)"] == ["–"] * len(BACKENDS)
    assert [r[-1] for r in rows if r[0] == "ds2-mini (digits)"] == ["cer 1.37%"] * 4 + ["cer 79.70%"] * (len(BACKENDS) - 4)
    assert "- ds2-mini (digits) (200 speech-digits test examples): pytorch eager sparse fp32 cer 79.40%" in \
        to_markdown(result)


def test_recurrent_stack_is_ds2_after_its_convolutions():
    import torch

    from bench.end_to_end import RecurrentStack
    from compressor.zoo import build_model

    model = build_model("ds2", n_freq=32, hidden=48, layers=2).eval()
    x = torch.randn(2, 1, 32, 20)
    with torch.no_grad():
        features = model.conv(x).flatten(1, 2).transpose(1, 2)  # [batch, time', C·F']
        assert torch.allclose(RecurrentStack(model)(features), model(x), atol=1e-6)
    [stack] = [s for s in specs(quick=True) if "recurrent layers only" in s.name]
    assert stack.input_shape == (1, 30, 32 * 41)  # DS2's 60 frames after the convolutions
