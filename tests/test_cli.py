"""The command line end to end (click's CliRunner and a subprocess), on small models; the
report's numbers are checked against the artifacts on disk."""

import json
import pickle
import struct
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.recipe import RecipeError, load_recipe, parse_recipe, shipped_recipes

from .models import GRU_FACTORY_SOURCE

FACTORY = GRU_FACTORY_SOURCE + '''
def build_with_inputs():
    return build(), (torch.randn(1, 9, 12),)
'''


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "netdef.py"
    path.write_text(FACTORY)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_on_a_users_model_writes_a_consistent_report(factory, tmp_path):
    out = tmp_path / "out"
    result = invoke("--model", f"{factory}:build_with_inputs", "--data", "none", "--method", "hard", "--sparsity",
                    "0.8", "--format", "both", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["checks_passed"] and report["prune"]["sparsity_reached"] == pytest.approx(0.8, abs=0.01)
    for name, artifact in report["artifacts"].items():
        assert (out / artifact["path"].split("/")[-1]).stat().st_size == artifact["size_bytes"], name
        assert report["parity"][name] <= artifact["parity_tolerance"]
    packed = sum(layer["stored_bytes"] for layer in report["size"]["layers"])
    assert report["size"]["packed_bytes"] == packed < report["size"]["dense_fp32_bytes"]
    onnx.checker.check_model(str(out / "model.onnx"))
    assert {p for p in report["plots"]} == {"size.png", "sparsity.png", "accuracy.png", "latency.png"}
    assert all((out / p).stat().st_size > 1000 for p in report["plots"])
    assert "report:" in result.output and "parity" in result.output


def test_state_dict_and_safetensors_checkpoints(factory, tmp_path):
    sys.path.insert(0, str(tmp_path))
    from netdef import build

    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "weights.pt")
    header, offset, blobs = {}, 0, []
    for name, tensor in state.items():
        data = tensor.numpy().astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    (tmp_path / "weights.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    for checkpoint in ("weights.pt", "weights.safetensors"):
        out = tmp_path / checkpoint.replace(".", "-")
        result = invoke(tmp_path / checkpoint, "--model", f"{factory}:build", "--data", "none", "--input-shape", "1,9,12",
                        "--method", "hard", "--format", "onnx", "--fp32", "--out", out, "--quiet")
        assert result.exit_code == 0, result.output
        assert json.loads((out / "report.json").read_text())["parity"]["onnx"] < 1e-4


class Payload:
    """Unpickling this object would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_module_is_refused_without_trust_and_never_runs(factory, tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    with open(evil, "wb") as f:
        pickle.dump({"weight": Payload(str(marker))}, f)
    result = invoke(evil, "--model", f"{factory}:build", "--data", "none", "--input-shape", "1,9,12", "--out",
                    tmp_path / "out", "--quiet")
    assert result.exit_code == 2
    assert "pickled code" in result.output and "--trust-checkpoint" in result.output
    assert not marker.exists()


def test_state_dict_mismatch_lists_the_keys(factory, tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    result = invoke(tmp_path / "wrong.pt", "--model", f"{factory}:build", "--data", "none", "--input-shape", "1,9,12",
                    "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2
    assert "missing gru.weight_ih_l0" in result.output and "shape mismatch fc.weight (3, 3) vs model (5, 32)" in result.output


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "sparsity = 1.0"),
    (["--block", "16by1"], "not a block shape"),
    (["--target", "riscv"], "unknown target 'riscv'"),
    (["--recipe", "no-such-recipe"], "recipe no-such-recipe not found"),
])
def test_bad_options_give_one_line_errors(args, message, tmp_path):
    result = invoke(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_recipes_parse_and_overrides_win(tmp_path):
    assert {"default", "narang-gradual-90", "hard-90", "block-16x1"} <= set(shipped_recipes())
    for name in shipped_recipes():
        load_recipe(name)
    recipe = parse_recipe('[prune]\nmethod = "hard"\nsparsity = 0.8\n[export]\nformats = ["onnx"]\n')
    assert recipe.prune.method == "hard" and recipe.export.formats == ["onnx"] and recipe.pack.int8
    assert recipe.override(prune__sparsity=0.5).prune.sparsity == 0.5
    with pytest.raises(RecipeError, match="unknown key 'sparsty' in \\[prune\\]"):
        parse_recipe("[prune]\nsparsty = 0.8\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        parse_recipe("[prune\n")
    with pytest.raises(RecipeError, match="activations = 'int4': use fp32 or int8"):
        parse_recipe('[export]\nactivations = "int4"\n')
    with pytest.raises(RecipeError, match="activations = 'int8' needs int8 weights: set \\[pack\\] int8 = true"):
        parse_recipe('[pack]\nint8 = false\n[export]\nactivations = "int8"\n')
    with pytest.raises(RecipeError, match="target 'aarch64-linux' has none: set activations = 'fp32'"):
        parse_recipe('[export]\nactivations = "int8"\ntargets = ["aarch64-linux"]\n')


def test_zoo_lists_models_checkpoints_and_recipes():
    result = invoke("zoo")
    assert result.exit_code == 0
    assert "ds2-mini-digits" in result.output and "resnet8" in result.output and "block-16x1" in result.output


def test_check_runs_any_onnx_artifact(factory, tmp_path):
    out = tmp_path / "out"
    assert invoke("export", "--model", f"{factory}:build_with_inputs", "--data", "none", "--format", "onnx",
                  "--out", out, "--quiet").exit_code == 0
    result = invoke("check", out / "model.onnx", "--input-shape", "3,9,12")  # dynamic batch
    assert result.exit_code == 0 and "output 0: shape (3, 9, 5)" in result.output
    wrong = invoke("check", out / "model.onnx", "--input-shape", "3,9,13")
    assert wrong.exit_code == 2 and wrong.output.startswith("error:")


def test_subprocess_prune_stage(factory, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipeline", "prune", "--model", f"{factory}:build", "--data", "none",
                           "--method", "hard", "--sparsity", "0.75", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    state = torch.load(out / "pruned.pt", weights_only=True)
    assert float((state["gru.weight_hh_l0"] == 0).float().mean()) == pytest.approx(0.75, abs=0.01)


def test_embedded_default_job_small(tmp_path):
    """The README's first command with 40 fine-tuning steps."""
    out = tmp_path / "out"
    result = invoke("--steps", "40", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["artifacts"]) == {"onnx", "tvm host"} and report["checks_passed"]
    assert report["metric"] == "cer" and set(report["metrics"]) >= {"pytorch dense", "pytorch pruned", "onnx runtime"}
    assert report["size"]["compression"] > 8



def test_pack_stage_writes_packed_weights(factory, tmp_path):
    from compressor.packed_model import load_packed

    sys.path.insert(0, str(tmp_path))
    from netdef import build

    torch.save({k: v * (torch.rand_like(v) > 0.9) for k, v in build().state_dict().items()}, tmp_path / "sparse.pt")
    out = tmp_path / "out"
    result = invoke("pack", tmp_path / "sparse.pt", "--model", f"{factory}:build", "--out", out)
    assert result.exit_code == 0, result.output
    packed = load_packed(out / "packed.npz", build())
    assert packed.weights["gru.weight_hh_l0"].dtype == "int8" and "TOTAL" in result.output


def test_api_reference_is_current():
    from pathlib import Path

    from pipeline.apidoc import generate

    current = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    assert generate() == current, "docs/api.md is stale: run python -m pipeline.apidoc > docs/api.md"


CNN_FACTORY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
'''

TAYLOR_RECIPE = '''
[data]
task = "digits"
[prune]
method = "taylor"
sparsity = 0.4
steps = 60
freq = 5
taylor_step_fraction = 0.1
lr = 3e-3
[pack]
format = "dense"
int8 = false
[check]
batches = [1]
'''


def test_taylor_recipe_shrinks_the_model_and_exports_it(tmp_path):
    """--method taylor: Molchanov pruning while fine-tuning, a physically smaller model, exported and checked."""
    (tmp_path / "cnn.py").write_text(CNN_FACTORY)
    (tmp_path / "taylor.toml").write_text(TAYLOR_RECIPE)
    out = tmp_path / "out"
    result = invoke("--model", f"{tmp_path / 'cnn.py'}:build", "--recipe", tmp_path / "taylor.toml", "--format", "both",
                    "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    prune = report["prune"]
    assert prune["method"] == "taylor" and prune["target_reached"] and prune["params_fraction"] <= 0.6
    assert prune["sparsity_reached"] == pytest.approx(1 - prune["params_fraction"])
    removed = {row["name"]: row["pruned"] for row in prune["layers"]}
    assert removed["8"] == 0 and sum(removed.values()) > 0  # the output layer is never cut
    # the file holds the smaller model: its convolutions have the channels the report says are left
    graph = onnx.load(str(out / "onnx-steps" / "model.fp32.onnx")).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    conv_out = [weights[node.input[1]][0] for node in graph.node if node.op_type == "Conv"]
    assert conv_out == [16 - removed["0"], 32 - removed["3"]]
    assert report["input_fp32_bytes"] > report["size"]["dense_fp32_bytes"] == report["size"]["total_bytes"]
    assert report["checks_passed"]
    metrics = report["metrics"]
    accuracies = {name: metrics[name]["accuracy"] for name in ("pytorch pruned", "onnx runtime", "tvm host")}
    assert len(set(accuracies.values())) == 1, accuracies
    assert "onnx runtime input model fp32" in report["latency_ms"]["1"]
    assert "Units removed (Taylor" in (out / "report.md").read_text()


def test_taylor_prune_stage_writes_a_program_that_loads_without_the_project(tmp_path):
    (tmp_path / "cnn.py").write_text(CNN_FACTORY)
    (tmp_path / "taylor.toml").write_text(TAYLOR_RECIPE)
    out = tmp_path / "out"
    result = invoke("prune", "--model", f"{tmp_path / 'cnn.py'}:build", "--recipe", tmp_path / "taylor.toml",
                    "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "of the parameters (whole units)" in result.output
    small = torch.export.load(str(out / "pruned.pt2")).module()
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    conv_out = [p.shape[0] for name, p in small.named_parameters() if p.dim() == 4]
    assert conv_out[0] < 16 or conv_out[1] < 32
    exported = invoke("export", out / "pruned.pt2", "--data", "none", "--input-shape", "1,1,8,8", "--format", "onnx",
                      "--fp32", "--out", tmp_path / "export")
    assert exported.exit_code == 0, exported.output


def test_exported_program_is_pruned_one_shot_and_exported(factory, tmp_path):
    """A torch.export program (.pt2) with no Python class behind it: pruned, packed, exported, checked."""
    sys.path.insert(0, str(tmp_path))
    from netdef import build

    net = build().eval()
    x = torch.randn(2, 9, 12)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)),
                      tmp_path / "net.pt2")
    out = tmp_path / "out"
    result = invoke(tmp_path / "net.pt2", "--data", "none", "--input-shape", "1,9,12", "--method", "hard",
                    "--sparsity", "0.8", "--format", "both", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["checks_passed"] and report["prune"]["sparsity_reached"] == pytest.approx(0.8, abs=0.01)
    packed = {layer["name"] for layer in report["size"]["layers"]}
    assert packed == {"gru.weight_ih_l0", "gru.weight_hh_l0", "fc.weight"}
