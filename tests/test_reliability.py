"""Reliability and security through the real command line: full disks, NaN losses, hostile files,
concurrent and interrupted downloads, read-only caches, prediction over thousands of files, determinism."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CodeRunningPickle, cifar_python_batch, write_idx_dataset
from PIL import Image
from safetensors.torch import load_file

from cnnlab.data.catalog import DataFile
from cnnlab.training.checkpoint import MAGIC, read_checkpoint

FAULTS = str(Path(__file__).with_name("faults.py"))


def cnnlab(*args, env=None, fault=None, timeout=300):
    """Run the command line (with a fault injected, if given); returns the CompletedProcess."""
    env = {**os.environ, **(env or {})}
    command = [sys.executable, "-m", "cnnlab"]
    if fault:
        env["CNNLAB_FAULT"] = fault
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
        command = [sys.executable, FAULTS]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)


def train_args(root, run, *extra):
    # 120 images in batches of 8: 15 steps an epoch, a checkpoint every 5 steps
    return [
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--model",
        "cnn",
        "--model-arg",
        "spec=c8x2,p,f32",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--checkpoint-every",
        "5",
        "--progress",
        "none",
        "--run-dir",
        run,
        *extra,
    ]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("reliability")
    root = write_image_folder(tmp / "shapes")
    env = {"CNNLAB_CACHE": str(tmp / "cache")}
    result = cnnlab(*train_args(root, tmp / "reference"), env=env)
    assert result.returncode == 0, result.stderr
    return root, tmp / "reference", env


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------- full disk


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_says_how_to_go_on(shapes, tmp_path):
    root, reference, env = shapes
    run = tmp_path / "run"
    failed = cnnlab(*train_args(root, run), env=env, fault="checkpoint-enospc:3")  # at step 15
    assert failed.returncode == 2
    last_line = failed.stderr.strip().splitlines()[-1]
    assert "No space left on device" in last_line and f"cnnlab train --resume {run}" in last_line
    assert read_checkpoint(run / "last.ckpt")["step"] == 10  # the checkpoint before the failed one, intact
    assert read_checkpoint(run / "previous.ckpt")["step"] == 5
    assert not list(run.glob(".*.tmp")), "the half-written checkpoint was left behind"
    resumed = cnnlab("train", "--resume", run, "--progress", "none", env=env)  # space freed
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(run, reference)


# ---------------------------------------------------------------- NaN and infinite losses


def test_a_nan_loss_stops_the_run_with_its_step_by_default(shapes, tmp_path):
    root, _, env = shapes
    run = tmp_path / "run"
    result = cnnlab(*train_args(root, run), env=env, fault="nan-loss:12")
    assert result.returncode == 2
    assert "step 12 (epoch 1): the loss is nan; training stopped, the last good checkpoint is kept" in result.stderr
    assert read_checkpoint(run / "last.ckpt")["step"] == 10


def test_a_nan_gradient_under_a_finite_loss_stops_the_run_too(shapes, tmp_path):
    root, _, env = shapes
    run = tmp_path / "run"
    result = cnnlab(*train_args(root, run), env=env, fault="nan-grad:7")
    assert result.returncode == 2
    assert "step 7 (epoch 1): the loss is" in result.stderr and "but a gradient is NaN or infinite" in result.stderr
    assert read_checkpoint(run / "last.ckpt")["step"] == 5
    assert all(torch.isfinite(t).all() for t in read_checkpoint(run / "last.ckpt")["model"].values())


def test_on_nan_skip_skips_up_to_n_steps_and_says_so(shapes, tmp_path):
    root, _, env = shapes
    run = tmp_path / "run"
    result = cnnlab(*train_args(root, run, "--on-nan", "skip", "--max-nan-skips", "2"), env=env, fault="nan-loss:4,20")
    assert result.returncode == 0, result.stderr
    assert "step 4 (epoch 1): the loss is nan; update skipped (1 of 2 allowed" in result.stdout
    assert "step 20 (epoch 2): the loss is nan; update skipped (2 of 2 allowed" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nan_skipped"] == 2 and summary["steps"] == 30
    assert all(torch.isfinite(t).all() for t in load_file(run / "model.safetensors").values())


def test_on_nan_skip_stops_once_the_allowance_is_spent(shapes, tmp_path):
    root, _, env = shapes
    run = tmp_path / "run"
    result = cnnlab(
        *train_args(root, run, "--on-nan", "skip", "--max-nan-skips", "2"), env=env, fault="nan-loss:2,3,12"
    )
    assert result.returncode == 2
    assert "step 12 (epoch 1): the loss is nan; training stopped after 2 skipped steps" in result.stderr
    assert read_checkpoint(run / "last.ckpt")["step"] == 10


# ---------------------------------------------------------------- hostile files


def _framed(payload: bytes) -> bytes:
    """A checkpoint with a valid header and checksum around `payload`: the checksum is no defence."""
    return MAGIC + hashlib.sha256(payload).digest() + payload


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_on_resume(shapes, tmp_path):
    root, reference, env = shapes
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(
        (reference / "config.yaml").read_bytes().replace(str(reference).encode(), str(run).encode())
    )
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"model": CodeRunningPickle(marker)}, buffer)  # torch.save pickles the object as is
    (run / "last.ckpt").write_bytes(_framed(buffer.getvalue()))
    result = cnnlab("train", "--resume", run, "--progress", "none", env=env)
    assert result.returncode == 2
    assert "last.ckpt: refused to load" in result.stderr and "no usable checkpoint" in result.stderr
    assert not marker.exists()


def test_a_weights_file_whose_pickle_would_run_code_is_refused_by_predict(shapes, tmp_path):
    root, _, env = shapes
    marker = tmp_path / "pwned"
    evil = tmp_path / "resnet18.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "hook": CodeRunningPickle(marker)}, evil)
    result = cnnlab("predict", evil, root / "test", "--model", "resnet18", env=env)
    assert result.returncode == 2 and "resnet18.pth: refused" in result.stderr
    assert not marker.exists()


def test_a_cifar_batch_whose_pickle_would_run_code_is_refused_by_train(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = cifar_python_batch(10)[0]
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(good)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": CodeRunningPickle(marker), "labels": []}))
    result = cnnlab(
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        tmp_path / "data",
        "--epochs",
        "1",
        "--run-dir",
        tmp_path / "run",
        env={"CNNLAB_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2
    assert "data_batch_3: refused: global 'io.open' is not allowed" in result.stderr
    assert not marker.exists()


def _safetensors_with_header(header: dict | bytes, body: bytes = b"", claimed_length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed_length is None else claimed_length) + raw + body


@pytest.mark.parametrize(
    "content, why",
    [
        (
            _safetensors_with_header(
                {"conv.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}, b"\0" * 64
            ),
            "offsets beyond the end of the file",
        ),
        (_safetensors_with_header(b'{"a":', claimed_length=1 << 40), "a header larger than the file"),
        (
            _safetensors_with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, b"\0" * 16),
            "offsets that run backwards",
        ),
    ],
)
def test_a_safetensors_file_with_a_lying_header_is_refused(shapes, tmp_path, content, why):
    root, reference, env = shapes
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_bytes((reference / "model.json").read_bytes())
    (run / "model.safetensors").write_bytes(content)
    result = cnnlab("predict", run, root / "test", env=env)
    assert result.returncode == 2, why
    assert "model.safetensors: not a readable safetensors file" in result.stderr, why
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- datasets


def _tiny_mnist(http_server, tmp_path, prefix="ok"):
    """The mnist spec pointed at fixture files on the local server, with their real checksums."""
    import dataclasses

    from cnnlab.data.catalog import get_spec

    content = write_idx_dataset(tmp_path / "src", 20, 10)
    files = []
    for name in content:
        gz = (tmp_path / "src" / (name + ".gz")).read_bytes()
        http_server.files[name + ".gz"] = gz
        files.append(
            DataFile(name, "sha256:" + hashlib.sha256(content[name]).hexdigest(), None, hashlib.md5(gz).hexdigest())
        )
    return dataclasses.replace(
        get_spec("mnist"),
        counts={"train": 20, "test": 10},
        files={"mnist": tuple(files)},
        mirrors=(f"{http_server.base}/{prefix}/",),
        system_dirs=(),
    )


def _fetch_in_child(spec, cache, queue):
    os.environ["CNNLAB_CACHE"] = str(cache)
    from cnnlab.data.datasets import fetch

    try:
        queue.put(str(fetch("mnist", spec=spec, log=lambda m: None)))
    except Exception as exc:  # reported to the parent, which fails the test
        queue.put(f"error: {exc}")


def test_two_processes_fetching_at_once_download_each_file_once_and_both_succeed(http_server, tmp_path):
    spec = _tiny_mnist(http_server, tmp_path, prefix="slow")
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_fetch_in_child, args=(spec, cache, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    answers = [queue.get(timeout=5) for _ in workers]
    assert answers[0] == answers[1] and not answers[0].startswith("error"), answers
    downloads = {path: n for path, n in http_server.hits.items() if path.startswith("/slow/")}
    assert len(downloads) == 4 and set(downloads.values()) == {1}, downloads


def test_a_download_killed_midway_restarts_cleanly(http_server, tmp_path):
    spec = _tiny_mnist(http_server, tmp_path, prefix="slow")
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_fetch_in_child, args=(spec, cache, context.Queue()))
    child.start()
    folder = cache / "datasets" / "mnist"
    deadline = time.monotonic() + 30
    while not list(folder.glob(".*.part")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert list(folder.glob(".*.part")), "the kill should land mid-transfer"
    os.environ["CNNLAB_CACHE"] = str(cache)
    from cnnlab.data.datasets import fetch

    messages = []
    assert fetch("mnist", spec=spec, log=messages.append) == folder
    assert not list(folder.glob(".*.part")), "the partial download was left behind"
    assert any("partial download" in m for m in messages)


def test_a_read_only_cache_gets_a_clear_message(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    result = cnnlab("data", "fetch", "mnist", env={"CNNLAB_CACHE": str(cache)}, fault="readonly-cache")
    assert result.returncode == 2
    assert f"cannot write to the cache {cache}" in result.stderr and "Read-only file system" in result.stderr
    assert "set CNNLAB_CACHE" in result.stderr and "Traceback" not in result.stderr


def test_a_full_cache_during_a_download_leaves_nothing_behind(http_server, tmp_path, monkeypatch):
    import errno

    from cnnlab.data import download as download_module

    spec = _tiny_mnist(http_server, tmp_path)

    class FullDisk(io.RawIOBase):
        def __init__(self, path):
            self.file = builtins.open(path, "wb")

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.file.close()

    # the download streams into the atomic writer's temporary file, opened by name in download.py
    monkeypatch.setattr(download_module, "open", lambda path, mode="r": FullDisk(path), raising=False)
    from cnnlab.data.datasets import fetch
    from cnnlab.errors import DatasetError

    with pytest.raises(DatasetError, match="no space left in .*mnist while downloading .*set CNNLAB_CACHE"):
        fetch("mnist", spec=spec, log=lambda m: None)
    from cnnlab.data.datasets import cache_dir

    assert not [p for p in cache_dir().rglob("*") if p.is_file() and "locks" not in p.parts]


# ---------------------------------------------------------------- predict under load


def _image_folder_with_bad_files(folder: Path, count: int, bad_every: int = 100) -> list[Path]:
    """`count` small PNGs; every `bad_every`-th file is broken in one of four ways. Returns the bad files."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(png, format="PNG")
    png = png.getvalue()
    bad = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        if i % bad_every == bad_every - 1:
            kind = (i // bad_every) % 4
            path.write_bytes([png[: len(png) // 2], b"", b"not an image at all", png[:20] + b"\0" * 40][kind])
            bad.append(path)
        else:
            path.write_bytes(png)
    return bad


def _predict_with_peak_memory(run: Path, folder: Path, env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """`cnnlab predict` in a child that reports its own peak resident memory (kB) on its last line."""
    code = (
        "import resource, sys; from cnnlab.cli import main; rc = main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "predict", str(run), str(folder), "--top-k", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=900,
    )
    return result, int(result.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "count", [pytest.param(1000, id="1000"), pytest.param(10000, id="10000", marks=pytest.mark.slow)]
)
def test_predict_over_thousands_of_files_with_one_percent_bad(shapes, tmp_path, count):
    _, reference, env = shapes
    bad = _image_folder_with_bad_files(tmp_path / "many", count)
    result, peak_kb = _predict_with_peak_memory(reference, tmp_path / "many", env)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == count - len(bad) == count * 99 // 100
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped: ")]
    assert sorted(line.split(": ")[1] for line in skipped) == sorted(map(str, bad))
    small, small_peak_kb = _predict_with_peak_memory(reference, tmp_path / "many" / "00000.png", env)
    assert small.returncode == 0
    # streamed in batches: memory for thousands of files stays within 64 MB of memory for one
    assert peak_kb - small_peak_kb < 64 * 1024, (peak_kb, small_peak_kb)


# ---------------------------------------------------------------- determinism


def test_deterministic_runs_are_bitwise_equal_and_record_their_seeds_and_versions(shapes, tmp_path):
    root, _, env = shapes
    for name in ("a", "b"):
        result = cnnlab(*train_args(root, tmp_path / name, "--deterministic", "--seed", "3"), env=env)
        assert result.returncode == 0, result.stderr
    assert same_weights(tmp_path / "a", tmp_path / "b")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["seeds"]["data_order"] == 4
    assert summary["deterministic"] == {
        "requested": True,
        "deterministic_algorithms": True,
        "cudnn_benchmark": False,
        "cudnn_deterministic": True,
    }
    assert summary["versions"]["torch"] == torch.__version__ and summary["versions"]["cnnlab"]


def test_a_run_folder_in_use_is_not_resumed_by_a_second_process(shapes, tmp_path):
    import fcntl
    import shutil

    root, reference, env = shapes
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    with open(run / ".lock", "a") as held:  # as a live training process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        result = cnnlab("train", "--resume", run, "--epochs", "3", "--progress", "none", env=env)
    assert result.returncode == 2 and "is in use by another cnnlab process" in result.stderr
    assert read_checkpoint(run / "last.ckpt")["step"] == read_checkpoint(reference / "last.ckpt")["step"]
