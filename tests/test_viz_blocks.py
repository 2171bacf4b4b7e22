"""Residual blocks drawn with the shapes they give, and the receptive fields of a chain of conv and pool layers."""

import pytest
import torch
import torch.nn as nn

from cnnlab.errors import ModelError
from cnnlab.models import create_model
from cnnlab.models.summary import count_params, receptive_fields
from cnnlab.viz.blocks import block_layers, plot_blocks


@pytest.fixture(scope="module")
def resnet34():
    return create_model("resnet34")


@pytest.fixture(scope="module")
def resnet50():
    return create_model("resnet50")


def test_a_bottleneck_that_downsamples_lists_each_stage_with_the_shape_it_gives(resnet50):
    block = resnet50.layer2[0]
    info = block_layers(block, (256, 56, 56))
    assert [(s["layers"], s["shape"]) for s in info["stages"]] == [
        (["1x1 conv, 128", "BN", "ReLU"], (128, 56, 56)),
        (["3x3 conv, 128, /2", "BN", "ReLU"], (128, 28, 28)),  # torchvision's v1.5: the stride on the 3x3
        (["1x1 conv, 512", "BN"], (512, 28, 28)),
    ]
    assert info["shortcut"] == "1x1 conv, 512, /2 + BN" and info["shortcut_shape"] == (512, 28, 28)
    assert info["output"] == tuple(block(torch.zeros(1, 256, 56, 56)).shape[1:]) == (512, 28, 28)
    assert info["params"] == count_params(block)


def test_identity_padding_and_plain_shortcuts_are_told_apart(resnet34):
    assert block_layers(resnet34.layer1[1], (64, 56, 56))["shortcut"] == "identity"
    assert block_layers(create_model("resnet20").layer2[0], (16, 32, 32))["shortcut"] == "subsample + zero-pad"
    plain = block_layers(create_model("plain20").layer2[0], (16, 32, 32))
    assert plain["shortcut"] is None and plain["output"] == (32, 16, 16)


def test_plot_blocks_draws_each_block_with_its_shapes_and_cost(resnet34, resnet50):
    fig = plot_blocks([("basic", resnet34.layer1[1], (64, 56, 56)), ("bottleneck", resnet50.layer1[1], (256, 56, 56))])
    basic, bottleneck = fig.axes
    texts = {t.get_text() for t in bottleneck.texts}
    assert {
        "input 256x56x56",
        "1x1 conv, 64, BN, ReLU",
        "64x56x56",
        "1x1 conv, 256, BN",
        "256x56x56",
        "identity",
        "+",
        "output 256x56x56",
    } <= texts
    assert bottleneck.get_title() == "bottleneck\n70,400 parameters, 218.4 M MACs per image"
    assert basic.get_title().startswith("basic\n73,984 parameters")


def test_something_that_is_no_residual_block_is_refused_with_an_example():
    with pytest.raises(ModelError, match=r"Conv2d is not a residual block .*create_model\('resnet50'\).layer1\[0\]"):
        block_layers(nn.Conv2d(3, 8, 3), (3, 8, 8))
    with pytest.raises(ModelError, match="at least one"):
        plot_blocks([])


def test_receptive_fields_of_the_lecture_network_grow_faster_after_pooling():
    rows = receptive_fields(create_model("convnet"))
    assert [(r["type"], r["size"][0], r["step"][0]) for r in rows] == [
        ("Conv2d", 3, 1),
        ("Conv2d", 5, 1),
        ("MaxPool2d", 6, 2),
        ("Conv2d", 10, 2),
        ("Conv2d", 14, 2),
    ]
    unpooled = receptive_fields(create_model("cnn", spec="c5x2,c8x2,f128"))
    assert [r["size"] for r in unpooled] == [(3, 3), (5, 5), (7, 7), (9, 9)]
    assert [r["size"] for r in receptive_fields(create_model("convnet_module"))] == [r["size"] for r in rows]


def test_receptive_fields_match_the_input_pixels_that_move_an_output_unit():
    # Linear layers with positive weights: every input pixel in the field changes the centre unit, none outside.
    chain = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1),
        nn.AvgPool2d(2),
        nn.Conv2d(1, 1, (5, 3), padding=(2, 1)),
        nn.Conv2d(1, 1, 3, stride=2, padding=2, dilation=2),
        nn.AvgPool2d(3, stride=1),
    )
    for m in chain:
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 1.0)
    x = torch.ones(1, 1, 96, 96, requires_grad=True)
    out = chain(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows_hit, cols_hit = (x.grad[0, 0] != 0).any(1).nonzero(), (x.grad[0, 0] != 0).any(0).nonzero()
    measured = (int(rows_hit.max() - rows_hit.min() + 1), int(cols_hit.max() - cols_hit.min() + 1))
    assert receptive_fields(chain)[-1]["size"] == measured == (28, 24)


def test_receptive_fields_refuse_networks_with_shortcuts():
    with pytest.raises(ModelError, match="residual blocks .*no single chain"):
        receptive_fields(create_model("resnet20"))


def test_a_summary_at_depth_1_adds_the_layers_up_into_resnet_50s_stages(resnet50):
    from cnnlab.models.summary import summarize

    model = resnet50  # at 64x64 rather than 224x224: the same layers, 12x fewer MACs to wait for
    full, stages = summarize(model, (3, 64, 64)), summarize(model, (3, 64, 64), depth=1)
    assert [(r["name"], r["type"]) for r in stages["layers"]] == [
        ("conv1", "Conv2d"),
        ("bn1", "BatchNorm2d"),
        ("relu", "ReLU"),
        ("maxpool", "MaxPool2d"),
        ("layer1", "Sequential"),
        ("layer2", "Sequential"),
        ("layer3", "Sequential"),
        ("layer4", "Sequential"),
        ("avgpool", "AdaptiveAvgPool2d"),
        ("fc", "Linear"),
    ]
    assert [r["output_shape"] for r in stages["layers"][4:8]] == [
        [1, 256, 16, 16],
        [1, 512, 8, 8],
        [1, 1024, 4, 4],
        [1, 2048, 2, 2],
    ]
    assert sum(r["params"] for r in stages["layers"]) == stages["params"] == 25_557_032
    assert sum(r["macs"] for r in stages["layers"]) == stages["macs"] == full["macs"]
    layer2 = [r for r in stages["layers"] if r["name"] == "layer2"][0]
    assert layer2["params"] == sum(p.numel() for p in model.layer2.parameters())


def test_a_summary_at_depth_2_lists_resnet_34s_blocks_3_4_6_3(resnet34):
    from cnnlab.models.summary import summarize

    rows = summarize(resnet34, (3, 64, 64), depth=2)["layers"]
    blocks = [r["name"].split(".")[0] for r in rows if r["type"] == "BasicBlock"]
    assert [blocks.count(f"layer{i}") for i in range(1, 5)] == [3, 4, 6, 3]
    with pytest.raises(Exception, match="depth counts name parts .* at least 1, got 0"):
        summarize(create_model("resnet20"), (3, 32, 32), depth=0)
