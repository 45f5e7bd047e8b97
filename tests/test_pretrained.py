"""The shipped checkpoints load without unpickling code and reproduce the metrics on their cards."""

import pytest
import torch

from compressor.zoo.pretrained import RECIPES, load_card, load_pretrained, weights_path


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_checkpoint_matches_its_card(name):
    card = load_card(name)
    assert card["command"] == f"python -m compressor.zoo.pretrained train {name}"
    assert weights_path(name).stat().st_size < 6_000_000  # a few MB, float16
    state = torch.load(weights_path(name), weights_only=True)
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    model = load_pretrained(name)
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]
    task = RECIPES[name].task()
    metrics = task.evaluate(model)
    for key, value in card["metrics"].items():
        assert metrics[key] == pytest.approx(value, abs=0.005), key


def test_unknown_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown checkpoint"):
        load_pretrained("nope")
