import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mixed_images import jpeg_bytes, rotated_jpeg, textured, write_mixed_folder
from PIL import Image, JpegImagePlugin

from cnnlab.data import transforms
from cnnlab.data.transforms import decode_crop, eval_resize, random_resized_crop_box, sample_rng, to_model_mode
from cnnlab.errors import ImageError


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def reference_eval(im: Image.Image, size: int) -> np.ndarray:
    """torchvision's Resize(round(size / 0.875)) then CenterCrop(size), step by step."""
    short = round(size / 0.875)
    w, h = im.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = im.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(im.crop((left, top, left + size, top + size)))


def test_random_resized_crop_boxes_stay_in_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(50, 600)), int(rng.integers(50, 600))
        left, top, right, bottom = random_resized_crop_box(w, h, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        cw, ch = right - left, bottom - top
        if (cw, ch) != (w, h) and min(w / h, h / w) >= 0.75:  # not the fallback
            assert 0.08 * w * h * 0.9 <= cw * ch <= w * h
            assert 0.75 * 0.9 <= cw / ch <= 4 / 3 * 1.1


def test_random_resized_crop_falls_back_to_a_centre_crop_at_the_ratio_limit():
    # 1000 x 10: no area of 8% or more fits in 10 rows, so after 10 tries torchvision takes the centre 13 x 10
    assert random_resized_crop_box(1000, 10, np.random.default_rng(3)) == (493, 0, 506, 10)
    assert random_resized_crop_box(10, 1000, np.random.default_rng(3)) == (0, 493, 10, 506)


def test_draws_depend_only_on_the_sample_key():
    first = [sample_rng(5, 2, i).random() for i in range(4)]
    again = [sample_rng(5, 2, i).random() for i in reversed(range(4))][::-1]
    assert first == again and len(set(first)) == 4
    assert sample_rng(5, 3, 0).random() != first[0]


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (224, 224), (300, 231)])
def test_eval_crop_equals_resize_then_centre_crop(width, height):
    pixels = textured(width, height, 1)
    data = png_bytes(pixels)
    out = decode_crop(data, "x.png", 224, "RGB")
    ref = reference_eval(Image.fromarray(pixels), 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).max() <= 2  # one resize of the box instead of two steps: rounding only


def test_eval_resize_uses_torchvisions_rounding():
    # 500x375 -> shorter side 256: 341x256, centre 224 at left round(58.5) = 58 (banker's), top 16
    assert eval_resize(500, 375, 256, (224, 224)) == (341, 256, 58, 16)
    assert eval_resize(375, 500, 256, (224, 200)) == (256, 341, 28, 58)


def torch_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """What torchvision's Resize does to a uint8 tensor: antialiased bilinear, in torch's own kernel."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def test_train_crop_equals_crop_resize_flip_by_hand():
    pixels = textured(200, 150, 2)
    data = png_bytes(pixels)
    for index in range(20):
        out = decode_crop(data, "x.png", 64, "RGB", rng=sample_rng(0, 0, index))
        rng = sample_rng(0, 0, index)
        flip = rng.random() < 0.5
        left, top, right, bottom = random_resized_crop_box(200, 150, rng)
        ref = torch_resize(pixels[top:bottom, left:right], 64)
        assert np.array_equal(out, ref[:, ::-1] if flip else ref), index
        pillow = Image.fromarray(pixels).crop((left, top, right, bottom)).resize((64, 64), Image.BILINEAR)
        pillow = np.asarray(pillow.transpose(Image.FLIP_LEFT_RIGHT) if flip else pillow)
        assert np.abs(out.astype(int) - pillow).max() <= 2, index  # torch's kernel against Pillow's: rounding


def test_large_jpeg_is_decoded_in_draft_mode_only_when_the_crop_keeps_full_resolution(monkeypatch):
    monkeypatch.setattr(transforms, "_simplejpeg", None)  # Pillow's decoder
    monkeypatch.setattr(transforms, "_jpeg_region", None)
    data = jpeg_bytes(np.tile(textured(250, 188, 3), (8, 8, 1)))  # 2000 x 1504
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: calls.append(size) or original(self, mode, size),
    )
    fast = decode_crop(data, "big.jpg", 224, "RGB")
    # the eval box is 1316 pixels wide in the original: 1/4 scale still gives 329 >= 224 pixels
    assert calls == [(500, 376)]
    full = decode_crop(data, "big.jpg", 224, "RGB", draft=False)
    assert np.abs(fast.astype(int) - full).mean() < 3
    calls.clear()
    decode_crop(jpeg_bytes(textured(300, 240, 3)), "small.jpg", 224, "RGB")
    assert calls == []  # a 240-pixel crop would drop below 224 at 1/2 scale


def test_modes_are_converted_the_same_way_everywhere(tmp_path):
    files = write_mixed_folder(tmp_path, bad=False)
    palette = decode_crop(files["palette"].read_bytes(), "p.png", 48, "RGB")
    assert (palette[:, :20] == [200, 30, 30]).all() and (palette[:, -20:] == 255).all()  # transparent -> white
    gray16 = decode_crop(files["gray16"].read_bytes(), "g.png", 50, "L")
    assert gray16.shape == (50, 50, 1) and gray16[0, 0, 0] == 0xFF and gray16[0, -1, 0] == 0x80
    as_rgb = decode_crop(files["gray16"].read_bytes(), "g.png", 50, "RGB")
    assert (as_rgb[0, -1] == 0x80).all()
    cmyk = decode_crop(files["cmyk"].read_bytes(), "c.jpg", 72, "RGB")
    source = Image.open(files["cmyk"]).convert("RGB")
    assert np.abs(cmyk.astype(int) - reference_eval(source, 72)).max() <= 2
    rgba = to_model_mode(Image.open(files["rgba"]), "RGB")
    assert np.asarray(rgba)[0, 0].tolist() == [0, 180, 0] and np.asarray(rgba)[0, -1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied_before_cropping():
    upright = np.zeros((80, 60, 3), np.uint8)
    upright[:40, :, 0] = 255  # red on top
    upright[40:, :, 2] = 255
    out = decode_crop(rotated_jpeg(upright), "r.jpg", 60, "RGB")
    # the eval crop of a 60x80 upright image keeps its middle; top rows red, bottom rows blue
    assert out[2, 30, 0] > 200 and out[2, 30, 2] < 60
    assert out[-3, 30, 2] > 200 and out[-3, 30, 0] < 60


def test_undecodable_and_oversized_images_raise_image_error(monkeypatch):
    with pytest.raises(ImageError, match=r"^bad\.jpg: not a readable image"):
        decode_crop(b"\xff\xd8 not a jpeg", "bad.jpg", 32, "RGB")
    monkeypatch.setenv("CNNLAB_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(
        ImageError,
        match=r"big\.png: claims 20x20 pixels, more than cnnlab opens \(100\): "
        r"shrink it first, or raise CNNLAB_MAX_IMAGE_PIXELS$",
    ):
        decode_crop(png_bytes(np.zeros((20, 20, 3), np.uint8)), "big.png", 8, "RGB")


DECODERS = {"region": {}, "simplejpeg": {"_jpeg_region": None}, "pillow": {"_jpeg_region": None, "_simplejpeg": None}}


@pytest.mark.parametrize("decoder", ["region", "simplejpeg"])
def test_every_jpeg_decoder_gives_pillows_pixels_at_every_scale(monkeypatch, tmp_path, decoder):
    if decoder == "region" and transforms._jpeg_region is None:
        pytest.skip("the _jpeg_region extension is not built here (no C compiler or libjpeg headers at install)")
    if decoder == "simplejpeg":
        pytest.importorskip("simplejpeg")
    files = write_mixed_folder(tmp_path, bad=True)
    images = [
        jpeg_bytes(np.tile(textured(250, 188, 3), (8, 8, 1))),
        jpeg_bytes(textured(300, 240, 4)),
        jpeg_bytes(textured(160, 120, 5)[:, :, 0]),
        jpeg_bytes(textured(333, 251, 6), subsampling=0),
        jpeg_bytes(textured(301, 207, 7), subsampling=1, progressive=True),
        files["rotated"].read_bytes(),
        files["cmyk"].read_bytes(),
    ]

    def decode_all(overrides: dict) -> list[np.ndarray]:
        with monkeypatch.context() as m:
            for name, value in overrides.items():
                m.setattr(transforms, name, value)
            return [
                decode_crop(data, "x.jpg", 64, mode, rng=None if key is None else sample_rng(0, 0, key))
                for data in images
                for mode in ("RGB", "L")
                for key in (None, *range(12))
            ]

    for fast, slow in zip(decode_all(DECODERS[decoder]), decode_all(DECODERS["pillow"])):
        assert np.array_equal(fast, slow)
    for name in ("corrupt", "truncated"):  # broken files fail as they do with Pillow
        with monkeypatch.context() as m:
            for attr, value in DECODERS[decoder].items():
                m.setattr(transforms, attr, value)
            for key in (None, 0, 1, 2):
                with pytest.raises(ImageError, match="not a readable image"):
                    decode_crop(
                        files[name].read_bytes(), name, 32, "RGB", rng=None if key is None else sample_rng(0, 0, key)
                    )
