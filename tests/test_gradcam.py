"""Grad-CAM: its numbers against a direct computation, the layer it picks on every registered model, and on a
net trained for a few seconds, that it points at the quadrant that decides the class."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cnnlab.errors import ModelError
from cnnlab.models import create_model, list_models
from cnnlab.viz.gradcam import cam_layers, default_cam_layer, grad_cam, overlay


class Tiny(nn.Module):
    """conv -> ReLU -> dense: the gradient of a logit with respect to the ReLU's maps is the dense row itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.relu = nn.ReLU(inplace=True)  # in place, as the lecture's nets: the capture must not be overwritten
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_values_equal_a_direct_computation_on_a_tiny_net():
    torch.manual_seed(0)
    net = Tiny()
    x = torch.randn(3, 2, 6, 6)
    maps = F.relu(F.conv2d(x, net.conv.weight, net.conv.bias))  # (3, 3, 4, 4)
    logits = net.fc(maps.flatten(1))
    for target in (None, 4, [0, 2, 1]):
        results = grad_cam(net, x, layer="relu", target=target)
        wanted = logits.argmax(1).tolist() if target is None else [target] * 3 if isinstance(target, int) else target
        for i, r in enumerate(results):
            row = net.fc.weight[wanted[i]].detach().view(3, 4, 4)  # d logit / d maps, no autograd needed
            alpha = row.mean(dim=(1, 2))
            raw = F.relu((alpha[:, None, None] * maps[i].detach()).sum(0))
            assert r.target == wanted[i] and r.layer == "relu"
            torch.testing.assert_close(r.weights, alpha)
            torch.testing.assert_close(r.raw, raw)
            up = F.interpolate(raw[None, None], size=(6, 6), mode="bilinear", align_corners=False)[0, 0]
            torch.testing.assert_close(r.cam, up.clamp_min(0))
            torch.testing.assert_close(r.probs, logits[i].softmax(0).detach())
    assert net.relu.inplace is True  # put back as it was


def test_bad_layer_and_class_are_named():
    net = Tiny()
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(ModelError, match="no layer 'conv9' for Grad-CAM; layers with maps: conv, relu"):
        grad_cam(net, x, layer="conv9")
    with pytest.raises(ModelError, match=r"class index 7 is not valid: the model has 5 classes \(0..4\)"):
        grad_cam(net, x, layer="relu", target=7)
    with pytest.raises(ModelError, match="layer 'fc' gives shape"):
        grad_cam(net, x, layer="fc")


@pytest.mark.parametrize(
    "name,kwargs,shape,want",
    [
        ("convnet", {}, (3, 32, 32), "8"),  # the ReLU after the last conv, before the head
        ("cnn", {"spec": "c8,p,c16,p,f32"}, (3, 32, 32), "4"),
        ("lenet5", {}, (1, 32, 32), "act3"),  # c5 gives 1x1 maps: the stage before it
        ("resnet20", {}, (3, 32, 32), "layer3"),
        ("resnet18", {}, (3, 64, 64), "layer4"),
        ("airbench94", {}, (3, 32, 32), "layer3"),
        ("alexnet", {"num_classes": 10}, (3, 224, 224), "features"),
    ],
)
def test_default_layer_is_the_last_conv_stage(name, kwargs, shape, want):
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    assert default_cam_layer(model, shape) == want
    assert want in cam_layers(model, shape)


def test_every_registered_model_has_a_default_layer():
    deep = {
        "resnet34",
        "resnet101",
        "resnet152",
        "resnet1202",
        "resnext50_32x4d",
        "wide_resnet50_2",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "plain32",
        "plain44",
        "plain56",
        "plain110",
    }  # deeper copies of others
    shapes = {"alexnet": (3, 96, 96), "lenet5": (1, 32, 32), "resnet18": (3, 64, 64), "resnet50": (3, 64, 64)}
    for name in sorted(set(list_models()) - deep):
        with torch.device("meta"):
            model = create_model(name)
        model = model.to_empty(device="cpu")  # arbitrary values: only the shapes matter here
        layer = default_cam_layer(model, shapes.get(name, (3, 32, 32)))
        assert layer in ("layer3", "layer4", "features", "act3", "conv4", "8"), (name, layer)


def quadrant_images(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 grey noise; class 0 has a bright horizontal bar somewhere in the top-left quadrant, class 1 a
    vertical one, class 2 none. The other three quadrants hold noise only."""
    x = rng.uniform(0, 0.4, (n, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 3, n)
    for i in range(n):
        r, c = rng.integers(0, 4, 2)  # a 5x1 or 1x5 bar stays inside rows and columns 0..7
        long, short = slice(r, r + 5), slice(c + 2, c + 3)
        if y[i] < 2:
            rows, cols = (long, short) if y[i] else (short, long)
            x[i, 0, rows, cols] = 1.0
    return torch.from_numpy(x), torch.from_numpy(y)


def test_cam_mass_lands_in_the_quadrant_that_decides_the_class():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # global average pooling before the class layer, as in the ResNets: the net cannot read a bar's position from
    # the head's weights, only from where its maps light up (a dense head on flattened maps often learns "no
    # vertical bar here" instead, evidence that Grad-CAM, which keeps only positive sums, does not show)
    model = create_model("cnn", spec="c8,c8,g", in_channels=1, input_size=16, num_classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = quadrant_images(1024, rng)
    for _step in range(150):  # about a second on one CPU core
        idx = torch.from_numpy(rng.integers(0, len(x), 64))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = quadrant_images(64, np.random.default_rng(1))
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.9, accuracy
    # Grad-CAM shows the evidence for a class; "no bar" (class 2) has none, so the bars' classes are the test
    for c in (0, 1):
        results = grad_cam(model, xt[yt == c], target=c)
        shares = [float(r.cam[:8, :8].sum() / r.cam.sum()) for r in results]
        assert results[0].layer == "3" and all(r.cam.sum() > 0 for r in results)  # the ReLU after the second conv
        assert np.median(shares) > 0.8, (c, shares)  # a quarter of the image holds most of the evidence


def test_overlay_keeps_the_image_where_the_cam_is_zero():
    image = np.full((4, 4), 100, dtype=np.uint8)
    cam = torch.zeros(4, 4)
    cam[0, 0] = 2.0
    out = overlay(image, cam)
    assert out.shape == (4, 4, 3) and (out[1:, 1:] == 100).all()
    assert out[0, 0, 0] > 100  # the hottest pixel turns red


def test_cli_viz_cam_writes_one_overlay_per_image(tmp_path, capsys):
    from cnnlab.cli import main
    from cnnlab.inference.weights import save_weights

    torch.manual_seed(0)
    model = create_model("cnn", spec="c4,p,f8", input_size=16, num_classes=3)
    save_weights(
        model,
        tmp_path / "model.safetensors",
        {
            "model": "cnn",
            "model_args": {"spec": "c4,p,f8", "input_size": 16, "num_classes": 3},
            "classes": ["a", "b", "c"],
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "input_shape": [3, 16, 16],
        },
    )
    rng = np.random.default_rng(0)
    for name in ("one.png", "two.png"):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    code = main(
        [
            "viz",
            "cam",
            str(tmp_path / "model.safetensors"),
            str(tmp_path / "one.png"),
            str(tmp_path / "two.png"),
            "--class",
            "b",
            "--out",
            str(tmp_path / "cams"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert written == ["cam-one-b.png", "cam-two-b.png"], written
    assert "layer 1," in out and "class b" in out  # the ReLU after the only conv
    assert Image.open(tmp_path / "cams" / "cam-one-b.png").size == (16 * 8, 16 * 8)
    code = main(
        ["viz", "cam", str(tmp_path / "model.safetensors"), str(tmp_path / "bad.png"), "--out", str(tmp_path / "cams2")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bad.png: not a readable image" in err
    code = main(["viz", "cam", str(tmp_path / "model.safetensors"), str(tmp_path / "one.png"), "--class", "zebra"])
    err = capsys.readouterr().err
    assert code == 2 and "no class 'zebra'; classes: a, b, c" in err
