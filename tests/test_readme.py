"""The README's training-loop example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(tag: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {tag} .*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README example {tag!r} not found"
    return match.group(1)


def test_readme_training_loop_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(readme_example("training-loop"), str(README), "exec"), namespace)
    model = namespace["model"]
    assert type(model).__name__ == "Model" and not hasattr(model.rnn, "parametrizations")
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if "weight" in n)
    assert zeros > 0.8 * sum(p.numel() for n, p in model.named_parameters() if "weight_hh" in n)
    assert (tmp_path / "pruning-checkpoint.pt").exists()
    assert "TOTAL" in capsys.readouterr().out
