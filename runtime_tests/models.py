"""Models and inputs shared by the runtime tests (ONNX Runtime and TVM)."""

import torch
from torch import nn

from compressor import MagnitudePruner, OneShot, PruneGroup
from compressor.blocks import BlockShape
from compressor.zoo import build_model


class GRUModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(12, 24, num_layers=2, batch_first=True)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.gru(x)[0])


class BiLSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(12, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


SEQ = {"input": {0: "batch", 1: "time"}, "output": {0: "batch", 1: "time"}}
# name: (factory, example input, another input, dynamic axes)
CASES = {
    "linear-stack": (lambda: nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)),
                     torch.randn(2, 30), torch.randn(7, 30), None),
    "gru": (GRUModel, torch.randn(2, 9, 12), torch.randn(3, 17, 12), SEQ),
    "bilstm": (BiLSTMModel, torch.randn(2, 9, 12), torch.randn(1, 4, 12), SEQ),
    "resnet8": (lambda: build_model("resnet8"), torch.randn(2, 1, 28, 28), torch.randn(5, 1, 28, 28), None),
    "ds2-mini": (lambda: build_model("ds2-mini", hidden=64), torch.randn(2, 1, 64, 40), torch.randn(3, 1, 64, 71),
                 {"input": {0: "batch", 3: "time"}, "output": {0: "batch", 1: "time"}}),
    "charlm": (lambda: build_model("charlm", hidden=64), torch.randint(0, 63, (2, 20)), torch.randint(0, 63, (4, 33)),
               SEQ),
}


UNSTRUCTURED = BlockShape()


def pruned(model: nn.Module, block: BlockShape = UNSTRUCTURED, sparsity: float = 0.9) -> nn.Module:
    """``model`` pruned in one shot to ``sparsity`` (r×c blocks if ``block`` is given), masks finalized."""
    pruner = MagnitudePruner([PruneGroup(OneShot(sparsity), block=block)])
    pruner.prepare(model)
    pruner.step()
    return pruner.finalize()
