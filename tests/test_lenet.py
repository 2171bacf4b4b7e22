"""LeNet-5 (LeCun et al. 1998): the modern form's 61,706 parameters, the paper's C3 connection table."""

import pytest
import torch

from cnnlab.errors import ModelError
from cnnlab.models import LeNet5, create_model
from cnnlab.models.lenet import LENET5_C3_TABLE, ConnectionTableConv
from cnnlab.models.summary import summarize


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_modern_lenet5_has_61706_parameters_layer_by_layer():
    model = create_model("lenet5")
    assert isinstance(model, LeNet5)
    # C1 6*(1*25+1), C3 16*(6*25+1), C5 120*(16*25+1), F6 84*(120+1), output 10*(84+1)
    assert [_params(m) for m in (model.c1, model.c3, model.c5, model.f6, model.output)] == [
        156,
        2_416,
        48_120,
        10_164,
        850,
    ]
    assert _params(model) == 61_706


def test_connection_table_is_table_one_of_the_paper():
    # Table I read row by row: the C3 maps (columns) that each S2 map (row) feeds, X = connected
    rows = [
        "X   XXX  XXXX XX",
        "XX   XXX  XXXX X",
        "XXX   XXX  X XXX",
        " XXX  XXXX  X XX",
        "  XXX  XXXX XX X",
        "   XXX  XXXX XXX",
    ]
    table = [tuple(i for i in range(6) if rows[i][j] == "X") for j in range(16)]
    assert table == list(LENET5_C3_TABLE)


def test_connection_table_stores_only_the_connections_the_paper_counts():
    model = create_model("lenet5", connection_table=True)
    # C3 by hand: maps 0-5 read 3 S2 maps, 6-14 read 4, map 15 reads 6 -> (6*3 + 9*4 + 1*6) = 60 kernels of 5x5,
    # 60*25 = 1,500 weights, plus 16 biases = 1,516: the paper's "1,516 trainable parameters" for C3.
    assert _params(model.c3) == 6 * 3 * 25 + 9 * 4 * 25 + 1 * 6 * 25 + 16 == 1_516
    assert _params(model) == 61_706 - 2_416 + 1_516 == 60_806
    info = summarize(model, (1, 32, 32))
    # C3's connections over its 10x10 outputs, biases excluded: 60 kernels * 25 * 100 = 150,000 MACs
    assert sum(layer["macs"] for layer in info["layers"] if layer["name"].startswith("c3.")) == 150_000


def test_connection_table_conv_equals_a_full_conv_with_the_absent_kernels_zeroed():
    torch.manual_seed(0)
    sparse = ConnectionTableConv(LENET5_C3_TABLE, 5, 6)
    full = torch.nn.Conv2d(6, 16, 5)
    with torch.no_grad():
        full.weight.zero_()
        for conv, gather in zip(sparse.convs, (sparse.gather0, sparse.gather1, sparse.gather2)):
            fan_in = conv.in_channels // conv.groups
            maps = [j for j, row in enumerate(LENET5_C3_TABLE) if len(row) == fan_in]
            for g, j in enumerate(maps):
                for k in range(fan_in):
                    full.weight[j, gather[g * fan_in + k]] = conv.weight[g, k]
                full.bias[j] = conv.bias[g]
    x = torch.randn(3, 6, 14, 14)
    torch.testing.assert_close(sparse(x), full(x))


def test_unordered_table_rows_come_out_in_table_order():
    torch.manual_seed(0)
    table = [(0, 1), (2,), (1, 2), (0,)]  # fan-ins 2, 1, 2, 1: the grouped convs' outputs must be reordered
    conv = ConnectionTableConv(table, 3, 3)
    x = torch.randn(2, 3, 6, 6)
    out = conv(x)
    for j, row in enumerate(table):
        only = torch.zeros_like(x)
        only[:, list(row)] = x[:, list(row)]
        assert torch.allclose(out[:, j], conv(only)[:, j])  # map j depends on its table row's inputs only
        rest = x.clone()
        rest[:, list(row)] = 0
        assert not torch.allclose(out[:, j], conv(rest)[:, j])


@pytest.mark.parametrize("size", [28, 32])
def test_output_shape_at_28_and_32_pixels(size):
    model = create_model("lenet5", input_size=size, num_classes=10).eval()
    assert model.input_size == (size, size)
    with torch.no_grad():
        assert model.forward_features(torch.zeros(2, 1, size, size)).shape == (2, 120, 1, 1)
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)


def test_28_pixels_are_padded_by_2_with_zeros():
    torch.manual_seed(0)
    at28 = create_model("lenet5", input_size=28).eval()
    at32 = create_model("lenet5", input_size=32).eval()
    at32.load_state_dict(at28.state_dict())  # the same weights: padding holds none
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(at28(x), at32(torch.nn.functional.pad(x, (2, 2, 2, 2))))


def test_larger_inputs_widen_f6_and_other_options_build():
    model = create_model("lenet5", input_size=40, in_channels=3, num_classes=7, activation="lecun_tanh", pool="avg")
    assert model.f6.in_features == 120 * 3 * 3  # 40 -> 36 -> 18 -> 14 -> 7 -> 3
    assert model(torch.zeros(1, 3, 40, 40)).shape == (1, 7)
    assert isinstance(model.s2, torch.nn.AvgPool2d)
    assert torch.allclose(model.act1(torch.tensor([1.0, -1.0])), torch.tensor([1.0, -1.0]), atol=1e-4)
    with pytest.raises(ModelError, match="activation 'gelu'"):
        create_model("lenet5", activation="gelu")
