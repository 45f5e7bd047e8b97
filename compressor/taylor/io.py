"""Saving a shrunk model so that it loads without the pruning code.

:func:`save_shrunk` writes a ``torch.export`` program (``.pt2``: the graph in ATen operators
plus the weights; no Python class of this project is pickled).  Anyone with the same PyTorch
loads it with plain torch::

    import torch
    model = torch.export.load("small.pt2").module()     # an nn.Module (GraphModule)
    logits = model(images)

The batch dimension (dimension 0 of every input) is dynamic by default; pass
``dynamic_shapes`` as for ``torch.export.export`` for other dimensions (say the time axis of a
speech model), or ``dynamic_shapes=None`` for fixed shapes.  Alternatives: ``state_dict()``
plus the new widths read off the modules, or ``torch.save`` of the shrunk module where no
forward was regenerated (unpickling needs the model's classes, and
:class:`~compressor.taylor.modules.PrunedRNN` where one was made).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

BATCH = "batch"


def export_program(model: nn.Module, example_inputs: Sequence[torch.Tensor],
                   dynamic_shapes: object = BATCH) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` in eval mode (dimension 0 dynamic when ``dynamic_shapes`` is
    ``"batch"``)."""
    inputs = tuple(example_inputs)
    if isinstance(dynamic_shapes, str) and dynamic_shapes == BATCH:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)


def save_shrunk(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: str | Path,
                dynamic_shapes: object = BATCH) -> Path:
    """Write ``model`` as a ``torch.export`` program to ``path`` (suffix ``.pt2``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, example_inputs, dynamic_shapes)
    tmp = path.with_name(path.stem + ".tmp.pt2")
    torch.export.save(program, tmp)
    tmp.replace(path)
    return path


def load_shrunk(path: str | Path) -> nn.Module:
    """``torch.export.load(path).module()`` — plain torch, no project code needed."""
    return torch.export.load(str(path)).module()
