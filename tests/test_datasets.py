import dataclasses
import gzip
import hashlib
import os
import time

import pytest
import torch
from conftest import write_idx_dataset, write_image_folder

from cnnlab.data import CATALOG, cache_dir, channel_stats, get_spec, load_dataset
from cnnlab.data import datasets as datasets_module
from cnnlab.data.catalog import DataFile
from cnnlab.errors import DatasetError


def tiny_mnist(monkeypatch, content: dict[str, bytes] | None, n_train=20, n_test=10):
    """Register a 'mnist' spec sized for test files; checksums from `content` (None: checksums that never match)."""
    spec = get_spec("mnist")
    files = tuple(
        DataFile(f.name, ("sha256:" + hashlib.sha256(content[f.name]).hexdigest()) if content else "sha256:" + "0" * 64)
        for f in spec.files["mnist"]
    )
    tiny = dataclasses.replace(spec, counts={"train": n_train, "test": n_test}, files={"mnist": files}, system_dirs=())
    monkeypatch.setitem(CATALOG, "mnist", tiny)
    return tiny


def test_a_copy_with_the_published_content_is_verified(tmp_path, monkeypatch):
    content = write_idx_dataset(tmp_path / "mnist", 20, 10)
    tiny_mnist(monkeypatch, content)
    data = load_dataset("mnist", tmp_path)
    assert data.verified and data.shape == (1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (20, 1, 28, 28)
    assert data.train_labels.tolist() == [i % 10 for i in range(20)]


def test_recompressed_copy_still_verifies(tmp_path, monkeypatch):
    """Debian re-gzips Fashion-MNIST: checksums are of the decompressed content, so this passes."""
    content = write_idx_dataset(tmp_path / "mnist", 20, 10)
    for name, data in content.items():
        (tmp_path / "mnist" / (name + ".gz")).write_bytes(gzip.compress(data, compresslevel=1, mtime=12345))
    tiny_mnist(monkeypatch, content)
    assert load_dataset("mnist", tmp_path).verified


def test_a_copy_with_other_bytes_is_accepted_unverified_with_its_sha256(tmp_path, monkeypatch):
    content = write_idx_dataset(tmp_path / "mnist", 20, 10, gz=False)
    tiny_mnist(monkeypatch, None)
    data = load_dataset("mnist", tmp_path)
    assert not data.verified and "UNVERIFIED" in data.describe()
    by_name = {r["file"].rsplit("/", 1)[-1]: r for r in data.files}
    assert by_name["t10k-labels-idx1-ubyte"]["sha256"] == hashlib.sha256(content["t10k-labels-idx1-ubyte"]).hexdigest()
    assert all(r["status"] == "unverified" for r in data.files)


def test_truncated_file_is_named_and_nothing_is_cached(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "mnist", 20, 10, gz=False)
    tiny_mnist(monkeypatch, None)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)
    assert not list((cache_dir() / "decoded").glob("*")) if (cache_dir() / "decoded").exists() else True


def test_wrong_counts_are_refused(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "mnist", 20, 10)
    tiny_mnist(monkeypatch, None, n_train=30)
    with pytest.raises(DatasetError, match="train split has 20 images and 20 labels, expected 30"):
        load_dataset("mnist", tmp_path)


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    tiny_mnist(monkeypatch, None)
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", tmp_path / "nowhere")
    message = str(info.value)
    assert "not found" in message and str(tmp_path / "nowhere") in message and "cnnlab data fetch mnist" in message


def test_lookup_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    tiny_mnist(monkeypatch, None)
    write_idx_dataset(cache_dir() / "datasets" / "mnist", 20, 10, seed=1)
    write_idx_dataset(tmp_path / "env" / "mnist", 20, 10, seed=2)
    write_idx_dataset(tmp_path / "flag" / "mnist", 20, 10, seed=3)
    assert load_dataset("mnist").source == str(cache_dir() / "datasets" / "mnist")
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "env"))
    assert load_dataset("mnist").source == str(tmp_path / "env" / "mnist")
    assert load_dataset("mnist", tmp_path / "flag").source == str(tmp_path / "flag" / "mnist")


def test_decoded_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "mnist", 20, 10)
    tiny_mnist(monkeypatch, None)
    first = load_dataset("mnist", tmp_path)

    def no_parse(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(datasets_module, "parse_idx", no_parse)
    second = load_dataset("mnist", tmp_path)
    assert torch.equal(first.train_images, second.train_images) and second.files == first.files


def test_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "mnist", 20, 10)
    tiny_mnist(monkeypatch, None)
    first = load_dataset("mnist", tmp_path)
    for f in (cache_dir() / "decoded").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    assert torch.equal(load_dataset("mnist", tmp_path).test_images, first.test_images)


def test_channel_stats():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.5])


def test_image_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=(4, 2), size=12)
    data = load_dataset("imagefolder", root)
    assert data.classes == ["circle", "square", "stripe"]
    assert data.train_images.shape == (12, 3, 12, 12) and data.test_images.shape == (6, 3, 12, 12)
    assert sorted(data.train_labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_image_folder_with_an_empty_class(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=(2, 1), size=8)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty class folder\(s\): .*train/empty"):
        load_dataset("imagefolder", root)


def test_image_folder_with_non_image_files(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=(2, 1), size=8)
    (root / "train" / "square" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"non-image file\(s\) in the image folder: .*notes\.txt"):
        load_dataset("imagefolder", root)


def test_image_folder_with_a_corrupt_image(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=(2, 1), size=8)
    (root / "train" / "square" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"bad\.png: not a readable image"):
        load_dataset("imagefolder", root)


@pytest.mark.integration
def test_real_fashion_mnist_is_verified(fashion_mnist_dir):
    data = load_dataset("fashion-mnist", fashion_mnist_dir)
    assert data.verified and len(data.train_labels) == 60_000 and data.classes[0] == "T-shirt/top"


@pytest.mark.integration
def test_shared_cifar10_is_unverified_with_its_sha256_and_reloads_in_under_a_second(shared_cifar10):
    data = load_dataset("cifar10", shared_cifar10)
    assert not data.verified
    by_name = {r["file"].rsplit("/", 1)[-1]: r["sha256"] for r in data.files}
    assert by_name["data_batch_1.bin"] == "fca8c55fb03965d6928e00e9160ac136eb3e9721639b7b8e30f8c7df0ac37240"
    assert torch.bincount(data.train_labels).tolist() == [5000] * 10
    start = time.perf_counter()
    again = load_dataset("cifar10", shared_cifar10)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.train_images[:100], data.train_images[:100])
    mean, _ = channel_stats(data.train_images)
    assert mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-4)


def _edit_keeping_size_and_mtime(path, offset: int = -1) -> bytes:
    """Flip one byte of `path` in place, then restore its mtime: what a size-and-mtime check cannot see."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return bytes(data)


def test_a_source_edited_with_size_and_mtime_kept_is_decoded_again(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "mnist", 20, 10, gz=False)
    tiny_mnist(monkeypatch, None)
    first = load_dataset("mnist", tmp_path)
    edited = _edit_keeping_size_and_mtime(tmp_path / "mnist" / "t10k-images-idx3-ubyte")  # the last pixel
    logged = []
    second = load_dataset("mnist", tmp_path, log=logged.append)
    assert second.test_images[-1, 0, -1, -1].item() == edited[-1] != first.test_images[-1, 0, -1, -1].item()
    assert torch.equal(second.train_images, first.train_images)
    assert any("changed since they were cached" in line for line in logged)
    monkeypatch.setattr(datasets_module, "parse_idx", lambda *a: pytest.fail("decoded a third time"))
    assert torch.equal(load_dataset("mnist", tmp_path).test_images, second.test_images)  # the new entry serves


def test_the_cache_entry_holds_the_hash_of_the_bytes_it_decoded(tmp_path, monkeypatch):
    """A file edited while it is being decoded (size and mtime kept) is decoded again on the next load:
    the entry records the hash of the bytes read, not of the file as it is after decoding."""
    write_idx_dataset(tmp_path / "mnist", 20, 10, gz=False)
    tiny_mnist(monkeypatch, None)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    real_read = datasets_module.read_bytes
    edited = []

    def read_then_edit(p, *args, **kwargs):
        data = real_read(p, *args, **kwargs)
        if p == path and not edited:
            edited.append(_edit_keeping_size_and_mtime(path))
        return data

    monkeypatch.setattr(datasets_module, "read_bytes", read_then_edit)
    first = load_dataset("mnist", tmp_path)
    second = load_dataset("mnist", tmp_path)
    assert second.train_images[-1, 0, -1, -1].item() == edited[0][-1] != first.train_images[-1, 0, -1, -1].item()
