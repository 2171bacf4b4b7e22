"""Downloads against a local HTTP server on 127.0.0.1: no test reaches the internet."""

import dataclasses
import hashlib
import io
import tarfile

import pytest
from conftest import cifar_python_batch, write_idx_dataset

from cnnlab.data import CATALOG, cache_dir, fetch, get_spec, load_dataset
from cnnlab.data.catalog import Archive, DataFile
from cnnlab.data.download import download, extract_archive
from cnnlab.errors import DatasetError


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_first_good_mirror_wins_and_each_failure_is_one_line(http_server, tmp_path):
    http_server.files["a.bin"] = b"payload" * 1000
    lines = []
    path = download(
        "a.bin",
        [f"{http_server.base}/broken/", f"{http_server.base}/ok/"],
        tmp_path,
        md5(b"payload" * 1000),
        log=lines.append,
    )
    assert path.read_bytes() == b"payload" * 1000
    failures = [line for line in lines if "failed" in line]
    assert len(failures) == 1 and "/broken/a.bin" in failures[0] and "503" in failures[0]


def test_wrong_checksum_never_enters_the_cache(http_server, tmp_path):
    http_server.files["a.bin"] = b"tampered"
    with pytest.raises(DatasetError, match="all 1 mirror"):
        download("a.bin", [f"{http_server.base}/ok/"], tmp_path, md5(b"original"), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []  # no partial or temporary file left behind


def test_truncated_transfer_is_detected_and_the_next_mirror_used(http_server, tmp_path):
    data = bytes(range(256)) * 400
    http_server.files["a.bin"] = data
    lines = []
    path = download(
        "a.bin", [f"{http_server.base}/truncated/", f"{http_server.base}/ok/"], tmp_path, md5(data), log=lines.append
    )
    assert path.read_bytes() == data
    assert any("truncated" in line or "IncompleteRead" in line for line in lines if "failed" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_an_existing_good_file_is_not_downloaded_again(http_server, tmp_path):
    http_server.files["a.bin"] = b"x"
    download("a.bin", [f"{http_server.base}/ok/"], tmp_path, md5(b"x"), log=lambda m: None)
    download("a.bin", [f"{http_server.base}/ok/"], tmp_path, md5(b"x"), log=lambda m: None)
    assert http_server.hits == {"/ok/a.bin": 1}


def test_fetch_idx_dataset_end_to_end(http_server, tmp_path, monkeypatch):
    """`fetch` with the real code path; only the spec's URLs and checksums point at fixture files."""
    content = write_idx_dataset(tmp_path / "src", 20, 10)
    spec = get_spec("mnist")
    files = []
    for f in spec.files["mnist"]:
        gz = (tmp_path / "src" / (f.name + ".gz")).read_bytes()
        http_server.files[f.name + ".gz"] = gz
        files.append(DataFile(f.name, "sha256:" + hashlib.sha256(content[f.name]).hexdigest(), None, md5(gz)))
    tiny = dataclasses.replace(
        spec,
        counts={"train": 20, "test": 10},
        files={"mnist": tuple(files)},
        mirrors=(f"{http_server.base}/broken/", f"{http_server.base}/ok/"),
        system_dirs=(),
    )
    monkeypatch.setitem(CATALOG, "mnist", tiny)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("mnist")
    data = load_dataset("mnist", download=True, log=lambda m: None)
    assert data.verified and data.source == str(cache_dir() / "datasets" / "mnist")


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def test_fetch_cifar_archive_end_to_end(http_server, monkeypatch):
    batches = {name: cifar_python_batch(10, seed=i)[0] for i, name in enumerate(["data_batch_1", "test_batch"])}
    archive = _tar({f"cifar-10-batches-py/{n}": b for n, b in batches.items()})
    http_server.files["cifar-10-python.tar.gz"] = archive
    spec = dataclasses.replace(
        get_spec("cifar10"),
        counts={"train": 10, "test": 10},
        mirrors=(f"{http_server.base}/ok/",),
        files={"cifar-10-batches-py": tuple(DataFile(n, "md5:" + md5(b)) for n, b in batches.items())},
        archive=Archive("cifar-10-python.tar.gz", md5(archive), "cifar-10-batches-py"),
    )
    monkeypatch.setitem(CATALOG, "cifar10", spec)
    folder = fetch("cifar10", log=lambda m: None)
    assert sorted(p.name for p in folder.iterdir()) == ["data_batch_1", "test_batch"]
    assert not (folder.parent / "cifar-10-python.tar.gz").exists()
    data = load_dataset("cifar10")
    assert data.verified and data.train_images.shape == (10, 3, 32, 32)


@pytest.mark.parametrize(
    "members, links",
    [
        ({"../evil.txt": b"x"}, None),
        ({"/tmp/cnnlab-evil-absolute.txt": b"x"}, None),
        ({"folder/ok.txt": b"x"}, {"folder/link": "../../outside"}),
        ({"folder/ok.txt": b"x"}, {"folder/abs": "/etc/passwd"}),
    ],
)
def test_archives_escaping_the_target_are_refused(tmp_path, members, links):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar(members, links))
    target = tmp_path / "target"
    with pytest.raises(DatasetError, match="refusing the archive"):
        extract_archive(archive, target, "folder")
    assert not (tmp_path / "evil.txt").exists()
    assert not (target / "folder").exists()


def test_unwritable_cache_gets_a_clear_message(http_server, tmp_path):
    # Permission bits do not stop root, so the cache folder is made impossible: it lies under a regular file.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(DatasetError, match=r"cannot write to .*not-a-folder/cache.*set CNNLAB_CACHE"):
        download("a.bin", [f"{http_server.base}/ok/"], blocker / "cache", "0" * 32, log=lambda m: None)
