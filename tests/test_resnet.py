"""ResNets: torchvision's checkpoint layout, the paper's MACs, shortcut options and plain twins."""

import pytest
import torch
from conftest import CodeRunningPickle

from cnnlab.errors import CheckpointError, ModelError
from cnnlab.models import create_model
from cnnlab.models.resnet import PadShortcut
from cnnlab.models.summary import summarize


def torchvision_keys(layers: list[int], bottleneck: bool) -> set[str]:
    """torchvision's state-dict names for a ResNet, written out from its naming scheme."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{b}" for b in bn}
    convs = 3 if bottleneck else 2
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            prefix = f"layer{stage}.{i}"
            for c in range(1, convs + 1):
                keys |= {f"{prefix}.conv{c}.weight"} | {f"{prefix}.bn{c}.{b}" for b in bn}
            if i == 0 and (stage > 1 or bottleneck):
                keys |= {f"{prefix}.downsample.0.weight"} | {f"{prefix}.downsample.1.{b}" for b in bn}
    return keys


@pytest.mark.parametrize(
    "name, layers, bottleneck",
    [
        ("resnet18", [2, 2, 2, 2], False),
        ("resnet34", [3, 4, 6, 3], False),
        ("resnet50", [3, 4, 6, 3], True),
        ("resnet101", [3, 4, 23, 3], True),
        ("resnet152", [3, 8, 36, 3], True),
    ],
)
def test_state_dict_keys_follow_torchvision(name, layers, bottleneck):
    state = create_model(name).state_dict()
    assert set(state) == torchvision_keys(layers, bottleneck)
    if bottleneck:
        assert state["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
        assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: the stride sits on the 3x3
        assert state["fc.weight"].shape == (1000, 2048)
    else:
        assert state["layer3.0.downsample.0.weight"].shape == (256, 128, 1, 1)


@pytest.mark.parametrize(
    "name, gmacs",
    [("resnet18", 1.814), ("resnet34", 3.664), ("resnet50", 4.089), ("resnet101", 7.801), ("resnet152", 11.514)],
)
def test_macs_at_224_match_the_published_figures(name, gmacs):
    macs = summarize(create_model(name), (3, 224, 224))["macs"]
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01


def test_stride_placement_v1_5_and_original():
    v15 = create_model("resnet50")
    v1 = create_model("resnet50", stride_in_1x1=True)
    assert v15.layer2[0].conv2.stride == (2, 2) and v15.layer2[0].conv1.stride == (1, 1)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    x = torch.zeros(1, 3, 64, 64)
    assert v1(x).shape == v15(x).shape == (1, 1000)


def test_a_torchvision_style_checkpoint_loads_strictly_and_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet18").eval()
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")  # how torchvision's weight files are made
    loaded = create_model("resnet18", weights=str(tmp_path / "resnet18.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_mismatched_weights_name_the_keys_and_suggest_num_classes(tmp_path):
    torch.save(create_model("resnet18", num_classes=10).state_dict(), tmp_path / "ten.pth")
    with pytest.raises(CheckpointError) as info:
        create_model("resnet18", weights=str(tmp_path / "ten.pth"))
    message = str(info.value)
    assert "fc.weight: (10, 512) in the file, (1000, 512) in the model" in message
    assert "--num-classes 10" in message and "replace the head" in message
    with pytest.raises(CheckpointError, match="missing keys: layer1.2.bn1.bias") as info:
        create_model("resnet34", weights=str(tmp_path / "ten.pth"), num_classes=10)
    assert "--num-classes" not in str(info.value)
    torch.save(create_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match="unexpected keys: layer1.2.bn1.bias"):
        create_model("resnet18", weights=str(tmp_path / "r34.pth"))


def test_a_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        create_model("resnet18", weights=str(tmp_path / "list.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        create_model("resnet18", weights=str(tmp_path / "junk.pth"))


def test_a_weights_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": torch.zeros(1), "x": CodeRunningPickle(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        create_model("resnet18", weights=str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_option_a_shortcut_pads_channels_and_subsamples():
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2]) and out[:, :8].abs().sum() == 0


def test_shortcut_options_change_only_the_projections():
    a, b, c = (create_model("resnet20", shortcut=s) for s in "ABC")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(a) == 269_722
    # B projects twice (16->32, 32->64: 1x1 conv + BN), C projects in all 9 blocks
    assert count(b) == 269_722 + (16 * 32 + 64) + (32 * 64 + 128)
    assert count(c) > count(b)
    assert isinstance(a.layer2[0].downsample, PadShortcut) and a.layer1[0].downsample is None


def test_plain_net_is_the_residual_class_without_shortcuts():
    torch.manual_seed(0)
    plain, residual = create_model("plain20"), create_model("resnet20")
    assert type(plain) is type(residual)
    plain.load_state_dict(residual.state_dict())  # same parameters, same names
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(x), residual.eval()(x))
    assert all(not block.residual for stage in (plain.layer1, plain.layer2, plain.layer3) for block in stage)


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = create_model("resnet50", zero_init_residual=True)
    assert model.layer1[0].bn3.weight.abs().sum() == 0
    assert create_model("resnet20", zero_init_residual=True).layer1[0].bn2.weight.abs().sum() == 0


def test_small_stem_and_in_channels():
    model = create_model("resnet18_small_stem", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    gray = create_model("resnet50", in_channels=1, num_classes=5)
    assert gray(torch.zeros(1, 1, 64, 64)).shape == (1, 5)


def test_bad_depth_and_shortcut():
    from cnnlab.models.cifar_resnet import CifarResNet

    with pytest.raises(ModelError, match="depth 21 is not 6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ModelError, match="shortcut 'D' is not one of"):
        create_model("resnet20", shortcut="D")
