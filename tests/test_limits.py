"""The limits on files someone handed us (cnnlab.data.images.Limits): each one refuses in every path that reads
such a file, names the file, the limit and the setting that raises it, and raising it lets the file through.
The bombs themselves, measured in a child process (time and peak RSS), are in test_fuzz.py's BOMBS."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hostile import scan_bomb
from mixed_images import jpeg_bytes, textured
from PIL import Image

from cnnlab.data import transforms
from cnnlab.data.imagefolder import decode_image_folder, image_folder_files
from cnnlab.data.images import (
    ENVIRONMENT,
    Limits,
    check_encoded,
    jpeg_structure,
    limits,
    open_image,
    read_image_file,
    to_8bit,
)
from cnnlab.data.transforms import decode_crop, sample_rng, to_model_mode
from cnnlab.errors import CheckpointError, ConfigError, DatasetError, ImageError
from cnnlab.inference.predict import load_image
from cnnlab.inference.weights import load_weights, save_weights
from cnnlab.models import create_model

region = transforms._jpeg_region


def test_every_configurable_limit_reads_its_variable(monkeypatch):
    assert limits() == Limits()
    for name, variable in ENVIRONMENT.items():
        monkeypatch.setenv(variable, "4MiB" if name.endswith("bytes") else "123")
        assert getattr(limits(), name) == (4 << 20 if name.endswith("bytes") else 123), name
    monkeypatch.setenv("CNNLAB_MAX_MODEL_PARAMETERS", "2e9")
    assert limits().model_parameters == 2_000_000_000
    for bad in ("lots", "0", "1.5"):
        monkeypatch.setenv("CNNLAB_MAX_JPEG_SCANS", bad)
        with pytest.raises(ConfigError, match="CNNLAB_MAX_JPEG_SCANS"):
            limits()
    monkeypatch.setenv("CNNLAB_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(ConfigError, match=r"^CNNLAB_MAX_IMAGE_BYTES: 'lots' is not a size; write e\.g\. 256MB"):
        limits()


def test_the_marker_walk_reads_the_frame_and_counts_scans():
    pixels = textured(50, 30, 1)
    baseline = jpeg_bytes(pixels, subsampling=2)
    progressive = jpeg_bytes(pixels, subsampling=1, progressive=True)
    thumbnail = Image.Exif()
    thumbnail[0x0112] = 1
    got = jpeg_structure(baseline, "b.jpg")
    assert (got.width, got.height, got.sampling, got.scans, got.progressive) == (
        50,
        30,
        ((2, 2), (1, 1), (1, 1)),
        1,
        False,
    )
    got = jpeg_structure(progressive, "p.jpg")
    assert (
        got.sampling == ((2, 1), (1, 1), (1, 1))
        and got.progressive
        and got.scans == progressive.count(b"\xff\xda")
        and 5 <= got.scans <= 12
    )
    # a marker's bytes inside an APP segment (an EXIF thumbnail, a comment) are not counted
    with_comment = baseline[:2] + b"\xff\xfe\x00\x0a\xff\xda\xff\xda\xff\xda" + baseline[2:]
    assert jpeg_structure(with_comment, "c.jpg").scans == 1
    assert jpeg_structure(b"\x89PNG\r\n\x1a\n", "x.png") is None
    assert jpeg_structure(scan_bomb(8000, 8000, 60), "s.jpg").scans == 60


# Found by coverage-guided fuzzing (atheris over the marker walk): a frame header cut by the end of the file
# raised IndexError from the walk.
WALK_REGRESSIONS = [
    base64.b64decode("/9j/4AAQSkZJRgAeHh4eHh4eHh4eHh7kwhjoQwum6ukX4uFuUoRmIJbn9XfM5HTsi5aCX7uTfOLPdcLm/////899v45//9k=")
]


@pytest.mark.parametrize("data", WALK_REGRESSIONS)
def test_the_marker_walk_returns_or_refuses_on_what_fuzzing_found(data):
    try:
        jpeg_structure(data, "f.jpg")
    except ImageError as exc:
        assert str(exc).startswith("f.jpg: ")
    with pytest.raises(ImageError, match=r"^f\.jpg: "):
        decode_crop(data, "f.jpg", 16, "RGB")


def test_more_scans_than_allowed_are_refused_by_every_jpeg_decoder(monkeypatch):
    data = jpeg_bytes(textured(64, 48, 2), progressive=True)
    scans = data.count(b"\xff\xda")
    monkeypatch.setenv("CNNLAB_MAX_JPEG_SCANS", str(scans - 1))
    message = rf"^p\.jpg: a JPEG of more than {scans - 1} scans .*raise CNNLAB_MAX_JPEG_SCANS$"
    for decoders in ({}, {"_jpeg_region": None}, {"_jpeg_region": None, "_simplejpeg": None}):
        with monkeypatch.context() as m:
            for name, value in decoders.items():
                m.setattr(transforms, name, value)
            for rng in (None, sample_rng(0, 0, 1)):
                with pytest.raises(ImageError, match=message):
                    decode_crop(data, "p.jpg", 16, "RGB", rng=rng)
    if region is not None:
        with pytest.raises(ValueError, match=rf"^JPEG: more than {scans - 1} scans"):
            region.decode_region(data, 1, 0, 0, 4, 4, False, max_scans=scans - 1)
        assert len(region.decode_region(data, 1, 0, 0, 4, 4, False, max_scans=scans)) == 48
    monkeypatch.setenv("CNNLAB_MAX_JPEG_SCANS", str(scans))
    assert decode_crop(data, "p.jpg", 16, "RGB").shape == (16, 16, 3)


@pytest.mark.skipif(region is None, reason="the _jpeg_region extension is not built here")
def test_the_c_entry_point_caps_pixels_itself():
    data = scan_bomb(4095, 65500, 6)
    with pytest.raises(ValueError, match=r"^JPEG: claims 4095x65500 pixels, more than 67108864$"):
        region.decode_region(data, 1, 0, 0, 5, 5, True)
    with pytest.raises(ValueError, match=r"^JPEG: claims 4095x65500 pixels, more than 1000$"):
        region.decode_region(data, 1, 0, 0, 5, 5, True, max_pixels=1000)


def test_junk_where_a_marker_belongs_is_bounded(tmp_path):
    good = jpeg_bytes(textured(40, 30, 3))
    cut = 4 + int.from_bytes(good[4:6], "big")  # after the first segment (APP0)
    a_little = good[:cut] + b"\0" * 100 + good[cut:]  # a few bytes of padding, as some cameras write: accepted
    assert jpeg_structure(a_little, "a.jpg").width == 40
    assert np.asarray(Image.open(io.BytesIO(a_little))).shape == (30, 40, 3)
    junk = good[:cut] + bytes(range(1, 255)) * 300 + good[cut:]  # 76 KB of junk
    with pytest.raises(
        ImageError,
        match=rf"^j\.jpg: more than 65,536 bytes of junk where a JPEG marker belongs "
        rf"\(offset {cut}\); the file is damaged: re-encode or remove it$",
    ):
        check_encoded(junk, "j.jpg")


def test_the_file_size_cap_is_checked_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(textured(64, 64, 4)))
    size = path.stat().st_size
    monkeypatch.setenv("CNNLAB_MAX_IMAGE_BYTES", str(size - 1))
    message = (
        rf"big\.jpg: {size:,} bytes, more than an image file may have \({size - 1:,}\); shrink it, or raise "
        r"CNNLAB_MAX_IMAGE_BYTES$"
    )
    for read in (read_image_file, open_image, lambda p: load_image(p, (3, 16, 16))):
        with pytest.raises(ImageError, match=message):
            read(path)
    with pytest.raises(ImageError, match=message.replace("big\\.jpg", "^big\\.jpg")):
        decode_crop(path.read_bytes(), "big.jpg", 16, "RGB")  # bytes from a tar member: the same cap
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "big.jpg").write_bytes(path.read_bytes())
    with pytest.raises(DatasetError, match=r"big\.jpg: [\d,]+ bytes, more than an image file may have"):
        decode_image_folder(root, image_folder_files(root), log=lambda m: None)
    monkeypatch.setenv("CNNLAB_MAX_IMAGE_BYTES", str(size))
    assert open_image(path).size == (64, 64)


def test_wide_modes_keep_their_top_8_bits_without_wide_copies():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (37, 29), dtype=np.uint16)
    for im in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):  # I;16 and I
        want = (values >> 8).astype(np.uint8)
        assert np.array_equal(to_8bit(im), want), im.mode
        assert np.array_equal(np.asarray(to_model_mode(im, "L")), want), im.mode
    floats = rng.uniform(-50, 300, (5, 7)).astype(np.float32)
    assert np.array_equal(to_8bit(Image.fromarray(floats)), np.clip(floats, 0, 255).astype(np.uint8))
    png = io.BytesIO()
    Image.fromarray(values).save(png, "PNG")
    crop = decode_crop(png.getvalue(), "w.png", 37, "L", draft=False)  # the eval path's resize of the 8-bit image
    assert crop.shape == (37, 37, 1)


def test_a_sidecar_over_the_parameter_cap_is_refused_before_building(tmp_path, monkeypatch):
    model = create_model("cnn", spec="c4,p,f8", in_channels=1, num_classes=3, input_size=8)
    meta = {
        "model": "cnn",
        "model_args": {"spec": "c4,p,f8", "in_channels": 1, "num_classes": 3, "input_size": [8, 8]},
        "classes": ["a", "b", "c"],
        "mean": [0.5],
        "std": [0.25],
        "input_shape": [1, 8, 8],
    }
    save_weights(model, tmp_path / "model.safetensors", meta)
    held = sum(p.numel() for p in model.state_dict().values())
    monkeypatch.setenv("CNNLAB_MAX_MODEL_PARAMETERS", str(held - 1))
    with pytest.raises(
        CheckpointError,
        match=rf"model\.json: its spec describes {held:,} weights, more than cnnlab "
        rf"loads \({held - 1:,}\); the sidecar is damaged, or raise "
        r"CNNLAB_MAX_MODEL_PARAMETERS$",
    ):
        load_weights(tmp_path / "model.safetensors")
    monkeypatch.setenv("CNNLAB_MAX_MODEL_PARAMETERS", str(held))
    assert len(load_weights(tmp_path / "model.safetensors").classes) == 3
    (tmp_path / "model.json").write_text(json.dumps({**meta, "model": "cifar_resnet", "model_args": {"depth": 10**9}}))
    with pytest.raises(CheckpointError, match=r"depth 1,000,000,000 is more layers than cnnlab builds \(1,000\)"):
        load_weights(tmp_path / "model.safetensors")
