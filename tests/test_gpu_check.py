"""bench/gpu_check.py, the script for a lent GPU, cannot rot unseen: without CUDA it says there is nothing to
check; its device-agnostic checks (synthetic data, resume, --deterministic through the CLI, the plain-loop
baseline, the JSON report) run on the CPU in --cpu-smoke mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
CUDA_ONLY = {
    "auto-settings",
    "ddp-nccl",
    "throughput-convnet",
    "throughput-resnet20",
    "throughput-resnet50",
    "compile",
    "airbench94-epoch",
}


def gpu_check(*args, timeout=900):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def report(folder: Path) -> dict:
    return json.loads((folder / "gpu_check.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_says_there_is_nothing_to_check(tmp_path):
    result = gpu_check(tmp_path)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("no CUDA device: nothing to check")
    assert report(tmp_path)["mode"] == "no-cuda" and report(tmp_path)["checks"] == []


def test_a_spent_budget_skips_every_check_and_says_why(tmp_path):
    result = gpu_check("--cpu-smoke", "--budget", 0, tmp_path)
    assert result.returncode == 0, result.stderr
    checks = {c["name"]: c for c in report(tmp_path)["checks"]}
    assert {c["status"] for c in checks.values()} == {"SKIP"}
    assert checks["resume"]["summary"].startswith("time budget: 0 s left, the check needs about 20 s")
    assert checks["compile"]["summary"] == "needs a CUDA device (smoke run)"
    assert "0 passed, 0 failed, 11 skipped" in result.stdout


def test_an_unknown_check_name_is_refused_with_the_list(tmp_path):
    result = gpu_check("--cpu-smoke", "--only", "resum", tmp_path)
    assert result.returncode == 2
    assert "--only: unknown check(s) resum; checks: auto-settings, data-on-device, resume," in result.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_the_device_agnostic_checks(tmp_path):
    result = gpu_check("--cpu-smoke", "--budget", 1200, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = report(tmp_path)
    checks = {c["name"]: c for c in out["checks"]}
    assert out["mode"] == "cpu-smoke" and out["exit_code"] == 0
    assert {n for n, c in checks.items() if c["status"] == "SKIP"} == CUDA_ONLY
    assert {n for n, c in checks.items() if c["status"] == "PASS"} == {
        "data-on-device",
        "resume",
        "deterministic",
        "throughput-cnn",
    }
    data = checks["data-on-device"]["figures"]
    assert data["train_images_device"] == "cpu" and data["train_images_dtype"] == "torch.uint8"
    assert checks["resume"]["figures"]["bitwise_equal"] is True
    assert checks["deterministic"]["figures"]["cnn"]["outcome"] == "bitwise equal"
    speed = checks["throughput-cnn"]["figures"]
    assert min(speed["img_per_s"]["cnnlab"] + speed["img_per_s"]["plain_fp32"]) > 0
    assert speed["ratio_cnnlab_vs_plain_fp32"] == pytest.approx(
        speed["median"]["cnnlab"] / speed["median"]["plain_fp32"]
    )
    lines = [line for line in result.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == 11 and all(line.startswith(("PASS", "SKIP")) for line in lines)
