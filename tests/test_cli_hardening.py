"""Bad input, faults and interruptions through the command line: a one-line error naming the
problem and the fix, the documented exit code, nothing half-written, earlier outputs untouched,
and interrupted fine-tuning that resumes to the same masks and weights."""

import errno
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main

from .models import GRU_FACTORY_SOURCE

NETS = GRU_FACTORY_SOURCE + '''
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.gru = nn.GRU(12, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, tokens):
        x = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
        return self.fc(self.gru(x)[0])

def mixed():
    torch.manual_seed(0)
    return Mixed()

def empty():
    return nn.Sequential()

def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 64), nn.ReLU(), nn.Linear(64, 10))
'''

GRU_RUN = ["--data", "none", "--input-shape", "1,9,12", "--method", "hard", "--sparsity", "0.8", "--format", "onnx",
           "--fp32", "--quiet"]

PRUNE = ["prune", "--data", "digits", "--method", "gradual", "--sparsity", "0.8", "--steps", "1500",
         "--threads", "1", "--quiet"]


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, code: int = EXIT_BAD_INPUT) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_disk_mid_run_leaves_the_earlier_outputs_untouched(nets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke("--model", f"{nets}:build", *GRU_RUN, "--out", out).exit_code == 0
    before = snapshot(out)
    assert "model.onnx" in before and "report.json" in before

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.run.write_report", disk_full)  # after every artifact has been written
    line = one_line_error(invoke("--model", f"{nets}:build", *GRU_RUN, "--sparsity", "0.5", "--out", out))
    assert "No space left on device" in line and "free some space or choose another --out" in line
    assert snapshot(out) == before
    assert not list(out.glob(".partial-*"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_is_named_and_earlier_outputs_stay(nets, tmp_path, damage):
    sys.path.insert(0, str(tmp_path))
    from nets import build

    torch.save(build().state_dict(), tmp_path / "good.pt")
    out = tmp_path / "out"
    assert invoke(tmp_path / "good.pt", "--model", f"{nets}:build", *GRU_RUN, "--out", out).exit_code == 0
    before = snapshot(out)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 8)
    line = one_line_error(invoke(tmp_path / "bad.pt", "--model", f"{nets}:build", *GRU_RUN, "--out", out))
    assert "bad.pt" in line and "truncated or corrupt" in line
    assert snapshot(out) == before


def test_an_output_folder_that_cannot_be_created(nets, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_line_error(invoke("--model", f"{nets}:build", *GRU_RUN, "--out", blocker / "out"))
    assert "cannot write the output folder" in line and "--out" in line


def test_non_finite_weights_are_refused(nets, tmp_path):
    sys.path.insert(0, str(tmp_path))
    from nets import build

    state = build().state_dict()
    state["gru.weight_hh_l0"][3, 4] = float("nan")
    state["fc.bias"][0] = float("inf")
    torch.save(state, tmp_path / "bad.pt")
    line = one_line_error(invoke(tmp_path / "bad.pt", "--model", f"{nets}:build", *GRU_RUN, "--out", tmp_path / "o"))
    assert "non-finite weights in gru.weight_hh_l0 (1 NaN, 0 Inf), fc.bias (0 NaN, 1 Inf)" in line
    assert not (tmp_path / "o").exists()


def test_an_empty_model_is_refused(nets, tmp_path):
    line = one_line_error(invoke("--model", f"{nets}:empty", *GRU_RUN, "--out", tmp_path / "o"))
    assert "the model has no weights" in line


def test_wrong_input_shape_names_the_shape(nets, tmp_path):
    args = [a if a != "1,9,12" else "1,9,13" for a in GRU_RUN]
    line = one_line_error(invoke("--model", f"{nets}:build", *args, "--out", tmp_path / "o"))
    assert "does not accept inputs of shape 1,9,13" in line and "--input-shape" in line
    for stage in ("export", "prune"):
        line = one_line_error(invoke(stage, "--model", f"{nets}:build", *args, "--method", "taylor",
                                     "--out", tmp_path / "o"))
        assert "1,9,13" in line


def test_layers_the_method_cannot_prune_are_listed_and_left_dense(nets, tmp_path):
    out = tmp_path / "out"
    result = invoke("--model", f"{nets}:mixed", "--data", "none", "--input-shape", "2,7:int64", "--method", "hard",
                    "--sparsity", "0.8", "--format", "onnx", "--fp32", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    assert "note: left dense (not prunable by hard): emb (Embedding)" in result.output
    assert "note: left dense (not prunable by hard): conv (Conv1d)" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["left_dense"] == {"emb": "Embedding", "conv": "Conv1d"} and report["checks_passed"]
    assert "Left dense" in (out / "report.md").read_text()


def test_resume_refuses_what_it_cannot_continue(nets, tmp_path):
    out = tmp_path / "out"
    line = one_line_error(invoke("--model", f"{nets}:build", *GRU_RUN, "--resume", "--out", out))
    assert "does not fine-tune, so there is nothing to resume" in line
    line = one_line_error(invoke(*PRUNE, "--model", f"{nets}:cnn", "--resume", "--out", out))
    assert "no interrupted run" in line and "without --resume" in line
    (out / ".resume").mkdir(parents=True)
    (out / ".resume" / "train-state.pt").write_bytes(b"")
    (out / ".resume" / "settings.json").write_text(json.dumps({"prune.sparsity": 0.9}))
    line = one_line_error(invoke(*PRUNE, "--model", f"{nets}:cnn", "--resume", "--out", out))
    assert "used other settings" in line and "prune.sparsity" in line


# ------------------------------------------------------------------------------ interruptions



def _start(nets: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *PRUNE, "--model", f"{nets}:cnn", "--out", str(out),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt_after_a_checkpoint(process: subprocess.Popen, out: Path, sig: int, past_step: int) -> str:
    """Send ``sig`` once the resumable state has passed ``past_step``; return stderr."""
    state = out / ".resume" / "train-state.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists():
            try:
                step = torch.load(state, weights_only=True)["step"]
            except Exception:  # noqa: BLE001 - read while being replaced: try again
                step = -1
            if step > past_step:
                process.send_signal(sig)
                break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=240)
    return stderr


def test_interrupted_fine_tuning_resumes_to_the_same_masks_and_weights(nets, tmp_path):
    """Ctrl-C, then --resume, then SIGKILL, then --resume again ends exactly where one
    uninterrupted seeded run ends."""
    out = tmp_path / "interrupted"
    process = _start(nets, out)
    stderr = _interrupt_after_a_checkpoint(process, out, signal.SIGINT, 0)
    assert process.returncode == EXIT_INTERRUPTED and "run the same command with --resume" in stderr
    assert not (out / "pruned.pt").exists() and (out / ".resume" / "train-state.pt").exists()
    first_stop = torch.load(out / ".resume" / "train-state.pt", weights_only=True)["step"]

    process = _start(nets, out, "--resume")
    _interrupt_after_a_checkpoint(process, out, signal.SIGKILL, first_stop + 10)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "pruned.pt").exists()

    finished = _start(nets, out, "--resume")
    _, stderr = finished.communicate(timeout=600)
    assert finished.returncode == 0, stderr
    assert not (out / ".resume").exists()

    reference = tmp_path / "reference"
    straight = _start(nets, reference)
    _, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr
    resumed = torch.load(out / "pruned.pt", weights_only=True)
    expected = torch.load(reference / "pruned.pt", weights_only=True)
    assert resumed.keys() == expected.keys()
    for name in expected:
        assert torch.equal(resumed[name], expected[name]), name
    assert float((expected["4.weight"] == 0).float().mean()) > 0.5
