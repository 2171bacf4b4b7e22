import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnlab.errors import ConfigError, ImageError
from cnnlab.viz import conv
from cnnlab.viz.conv import (
    COLOR_FILTER_NAMES,
    VERTICAL_EDGE,
    color_filters,
    conv2d_by_hand,
    conv_macs,
    edge_feature_map,
    load_image,
    max_pool_by_hand,
    numeric_example,
)
from cnnlab.viz.pool import render_pool
from cnnlab.viz.slides import render_conv

GIF_LIMIT = 2 * 1024 * 1024  # bytes: the slides embed these GIFs


@pytest.mark.parametrize(
    "C, H, W, K, kh, kw, stride, padding, bias",
    [
        (1, 5, 5, 1, 3, 3, 1, 0, False),
        (3, 7, 6, 4, 3, 3, 2, 1, True),
        (2, 8, 9, 3, 5, 3, 1, 2, True),
        (3, 6, 6, 2, 1, 1, 1, 0, True),
        (4, 9, 7, 2, 3, 2, 3, 1, False),
        (2, 4, 4, 3, 4, 4, 1, 0, True),  # the filter covers the whole input: one output number per filter
    ],
)
def test_conv_by_hand_equals_torch(C, H, W, K, kh, kw, stride, padding, bias):
    g = torch.Generator().manual_seed(C * 100 + H * 10 + kh)
    x, w = (
        torch.randn(C, H, W, generator=g, dtype=torch.float64),
        torch.randn(K, C, kh, kw, generator=g, dtype=torch.float64),
    )
    b = torch.randn(K, generator=g, dtype=torch.float64) if bias else None
    want = F.conv2d(x[None], w, b, stride=stride, padding=padding)[0]
    got = conv2d_by_hand(x.numpy(), w.numpy(), None if b is None else b.numpy(), stride=stride, padding=padding)
    assert got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


def test_conv_by_hand_keeps_integers_exact_and_refuses_mismatched_shapes():
    x = np.arange(2 * 4 * 4).reshape(2, 4, 4)
    w = np.ones((1, 2, 3, 3), dtype=np.int64)
    out = conv2d_by_hand(x, w, np.array([5]))
    assert out.dtype == np.int64 and out[0, 0, 0] == x[:, :3, :3].sum() + 5
    with pytest.raises(ConfigError, match="span all 2 input channels"):
        conv2d_by_hand(x, np.ones((1, 3, 3, 3)))
    with pytest.raises(ConfigError, match="does not fit"):
        conv2d_by_hand(x, np.ones((1, 2, 5, 5)))


def test_numeric_example_is_cs231ns_and_matches_torch():
    ex = numeric_example(seed=0)
    assert ex.x.shape == (3, 5, 5) and set(np.unique(ex.x)) <= {0, 1, 2}
    assert ex.weight.shape == (2, 3, 3, 3) and set(np.unique(ex.weight)) <= {-1, 0, 1}
    assert ex.bias.tolist() == [1, 0] and (ex.stride, ex.padding) == (2, 1)
    assert ex.out.shape == (2, 3, 3)  # 3x3x2 in the lecture's (H, W, K) order
    want = F.conv2d(
        torch.from_numpy(ex.x)[None], torch.from_numpy(ex.weight), torch.from_numpy(ex.bias), stride=2, padding=1
    )[0]
    assert np.array_equal(ex.out, want.numpy())
    assert np.array_equal(numeric_example(0).x, ex.x) and not np.array_equal(numeric_example(1).x, ex.x)


def test_colour_filters_do_what_their_names_say():
    names, bank = color_filters(8)
    assert names == COLOR_FILTER_NAMES and bank.shape == (8, 3, 3, 3)
    flat = np.full((3, 5, 5), 0.6)  # a uniform grey: no edges, no colour contrast, no detail
    centre = conv2d_by_hand(flat, bank)[:, 1, 1]  # no padding: every window lies inside the image
    response = dict(zip(names, centre))
    for name in (
        "vertical edge",
        "horizontal edge",
        "red - green",
        "blue - yellow",
        "diagonal edge",
        "centre - surround",
    ):
        assert response[name] == pytest.approx(0, abs=1e-12), name
    assert response["blur"] == pytest.approx(0.6) and response["sharpen"] == pytest.approx(0.6)
    red = np.zeros((3, 3, 3))
    red[0] = 1.0
    assert conv2d_by_hand(red, bank[names.index("red - green")][None])[0, 0, 0] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="filters must be 1..8"):
        color_filters(9)


def test_render_conv_writes_the_slides(tmp_path):
    paths = render_conv(tmp_path / "slides", filters=3, max_frames=4)
    assert [p.name for p in paths] == [
        "conv_gray.gif",
        "conv_gray.png",
        "conv_color.gif",
        "conv_color.png",
        "conv_numeric.png",
    ]
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == p.suffix[1:].upper()
            if im.format == "GIF":
                assert im.is_animated and im.n_frames == 4  # capped by max_frames
                assert p.stat().st_size < GIF_LIMIT
                im.seek(im.n_frames - 1)  # every frame decodes
                im.load()
    assert sorted(q.name for q in (tmp_path / "slides").iterdir()) == sorted(p.name for p in paths)  # no temp files


@pytest.mark.parametrize("count", [0, 9])
def test_render_conv_refuses_a_bad_filter_count_before_writing(tmp_path, count):
    with pytest.raises(ConfigError, match="filters must be 1..8"):
        render_conv(tmp_path / "slides", filters=count)
    assert not (tmp_path / "slides").exists()


def test_load_image_shrinks_to_size_in_grey_or_colour(tmp_path):
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # pure red, wider than tall: centre-cropped to a square
    Image.fromarray(pixels).save(tmp_path / "red.png")
    rgb = load_image(tmp_path / "red.png", size=12, gray=False)
    assert rgb.shape == (12, 12, 3) and np.allclose(rgb, [1.0, 0.0, 0.0])
    gray = load_image(tmp_path / "red.png", size=12)
    assert gray.shape == (12, 12) and np.allclose(gray, 76 / 255)  # PIL's luma for red: 0.299 * 255


def test_unreadable_images_are_named(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        load_image(text)
    buffer = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.read_bytes()[:2000])
    with pytest.raises(ImageError, match="truncated.png: not a readable image"):
        load_image(truncated, gray=False)
    with pytest.raises(ImageError, match="missing.jpg: no such file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="notes.png"):
        render_conv(tmp_path / "slides", image=text)
    assert not (tmp_path / "slides").exists()


@pytest.mark.parametrize(
    "kernel, stride, shape",
    [(2, 2, (3, 8, 8)), (2, 2, (2, 7, 9)), (3, 2, (2, 9, 9)), (2, 1, (1, 5, 6)), (3, 3, (1, 9, 9))],
)
def test_max_pool_by_hand_equals_torch_with_indices(kernel, stride, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    want, want_idx = F.max_pool2d(x[None], kernel, stride, return_indices=True)
    got, idx = max_pool_by_hand(x.numpy(), kernel, stride)
    assert np.array_equal(got, want[0].numpy()) and np.array_equal(idx, want_idx[0].numpy())


def test_max_pool_by_hand_breaks_ties_as_torch_does_on_a_relu_map():
    fmap = edge_feature_map()  # vertical-edge conv of the default image, then ReLU: many windows all zero
    assert fmap.shape == (1, 16, 16) and (fmap == 0).mean() > 0.5
    want, want_idx = F.max_pool2d(torch.from_numpy(fmap)[None].double(), 2, 2, return_indices=True)
    got, idx = max_pool_by_hand(fmap)
    assert np.array_equal(got, want[0].numpy()) and np.array_equal(idx, want_idx[0].numpy())


def test_edge_feature_map_is_relu_of_the_vertical_edge_conv():
    gray = torch.from_numpy(conv.to_levels(conv.to_gray(conv.default_image()))).double()
    want = F.relu(F.conv2d(gray[None, None], torch.from_numpy(VERTICAL_EDGE).double()[None, None], padding=1))[0]
    assert np.array_equal(edge_feature_map(), want.numpy())


def test_render_pool_reports_shapes_and_the_next_layers_macs(tmp_path):
    info = render_pool(tmp_path)
    assert info["shape_before"] == (1, 16, 16) and info["shape_after"] == (1, 8, 8)
    assert info["macs_before"] == 16 * 16 * 1 * 64 * 9 == 147_456
    assert info["macs_after"] == 8 * 8 * 1 * 64 * 9 and info["mac_ratio"] == 4.0
    assert "147,456 MACs" in info["caption"] and "36,864" in info["caption"] and "4.00x fewer" in info["caption"]
    with Image.open(info["path"]) as im:
        assert im.format == "PNG" and info["path"] == tmp_path / "pool.png"


def test_render_pool_on_an_odd_sized_map_drops_the_last_row_and_column(tmp_path):
    fmap = np.random.default_rng(0).random((2, 15, 15))
    info = render_pool(tmp_path, fmap, c_in=32, c_out=64)
    assert info["shape_before"] == (2, 15, 15) and info["shape_after"] == (2, 7, 7)
    assert info["macs_before"] == conv_macs(15, 15, 32, 64) == 15 * 15 * 32 * 64 * 9
    assert info["mac_ratio"] == pytest.approx(225 / 49)


def test_an_animation_into_a_folder_not_made_yet_makes_it_and_returns_the_map(tmp_path):
    from cnnlab.viz.slides import animate_conv_gray

    image = np.arange(16).reshape(4, 4) % 10
    out = animate_conv_gray(image, VERTICAL_EDGE, tmp_path / "new" / "a.gif", tmp_path / "new" / "a.png", max_frames=4)
    assert Image.open(tmp_path / "new" / "a.gif").n_frames == 4 and (tmp_path / "new" / "a.png").is_file()
    assert np.array_equal(out, conv2d_by_hand(image[None], VERTICAL_EDGE[None, None], padding=1)[0])
