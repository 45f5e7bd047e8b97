"""The scan forms of recurrent layers (exporters.recurrence) compute what the layers compute: the
input bias joined to the recurrent one where the cell allows it, the two directions of DS2's
layers summed by the backward loop."""

import pytest
import torch
from torch import nn

from compressor.zoo.ds2 import SharedInputBiRecurrent
from exporters.recurrence import joins_recurrent_bias, recurrence, scan_recurrent_layers


@pytest.mark.parametrize("layer", [nn.GRU(6, 5, bidirectional=True), nn.LSTM(6, 5, num_layers=2),
                                   nn.RNN(6, 5, nonlinearity="relu"), nn.RNN(6, 5, bias=False),
                                   SharedInputBiRecurrent(6, 5, "rnn"), SharedInputBiRecurrent(6, 5, "gru")],
                         ids=["gru", "lstm", "rnn_relu", "rnn_no_bias", "ds2_rnn", "ds2_gru"])
def test_scan_form_computes_what_the_layer_computes(layer):
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    x = torch.randn(7, 3, 6)
    with torch.no_grad():
        expected, scanned = layer.eval()(x), scan_recurrent_layers(layer)(x)
    if isinstance(expected, tuple):
        expected, scanned = expected[0], scanned[0]
    torch.testing.assert_close(scanned, expected, rtol=1e-5, atol=1e-5)


def test_only_the_gru_keeps_its_input_bias_apart():
    bias = torch.zeros(3)
    assert [joins_recurrent_bias(cell, bias) for cell in ("gru", "lstm", "rnn_tanh", "rnn_clipped_relu")] == [
        False, True, True, True]
    assert not joins_recurrent_bias("lstm", None)


def test_addend_is_added_to_the_output():
    torch.manual_seed(1)
    gi, state, w, b = torch.randn(5, 2, 12), torch.zeros(2, 2, 3), torch.randn(12, 3), torch.randn(12)
    addend = torch.randn(5, 2, 3)
    y, final = recurrence(gi, state, w, b, "lstm", True)
    summed, final_summed = recurrence(gi, state, w, b, "lstm", True, addend)
    torch.testing.assert_close(summed, y + addend)
    torch.testing.assert_close(final_summed, final)
