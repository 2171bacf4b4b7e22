"""`cnnlab experiment`: the degradation and seeds experiments over ordinary `cnnlab train` runs; resume after a
SIGKILL, printed member commands, the refusal of a mismatched rerun, the page in a real browser."""

import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cnnlab.errors import ConfigError
from cnnlab.experiments import PAPER_TEST_ERROR, parse_depths, seed_statistics
from cnnlab.experiments.degradation import verdict
from cnnlab.experiments.flags import default_threads, recipe_args
from cnnlab.files import file_lock
from cnnlab.training.config import TrainConfig
from cnnlab.training.recipes import apply_recipe

MEMBERS = ["plain8", "plain14", "resnet8", "resnet14"]


def cnnlab(*args, env, check=True, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def tiny_flags(root, threads=("--threads", "1")):
    # 120 images in batches of 8: 15 steps; one thread each (two threads fighting over a busy CPU are far slower)
    return [
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-report",
        *threads,
    ]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from conftest import write_image_folder

    tmp = tmp_path_factory.mktemp("experiment")
    root = write_image_folder(tmp / "shapes", per_class=(40, 10), size=16)
    env = {**os.environ, "CNNLAB_CACHE": str(tmp / "cache")}
    return tmp, root, env


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.fixture(scope="module")
def killed_and_rerun(setting):
    """A tiny degradation experiment (depths 8 and 14, one epoch), its runner SIGKILLed while plain14 trains,
    then the same command again."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the runner's members stop with it through Linux's parent-death signal")
    tmp, root, env = setting
    out = tmp / "degradation"
    command = [
        sys.executable,
        "-m",
        "cnnlab",
        "experiment",
        "degradation",
        "--depths",
        "8,14",
        "--out",
        str(out),
        *tiny_flags(root),
        "--checkpoint-every",
        "3",
    ]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in runner.stdout:
        lines.append(line)
        if "plain14: starting" in line:
            break
    deadline = time.monotonic() + 300
    while not (out / "plain14" / "last.ckpt").exists():  # plain14 is inside its epoch
        assert time.monotonic() < deadline and runner.poll() is None, "".join(lines)
        time.sleep(0.02)
    (member,) = _children(runner.pid)
    os.kill(member, signal.SIGSTOP)  # frozen, so that it cannot finish before its runner dies
    finished = out / "plain8" / "model.safetensors"
    before = (finished.read_bytes(), finished.stat().st_mtime_ns)
    runner.kill()
    runner.wait()
    os.kill(member, signal.SIGCONT)  # it finds the parent-death SIGTERM: checkpoint, exit 143
    assert not (out / "plain14" / "summary.json").exists()
    rerun = cnnlab(*command[3:], env=env)
    return out, before, rerun, command


def test_rerun_keeps_finished_members_and_resumes_the_interrupted_one(killed_and_rerun):
    out, (weights, mtime), rerun, _ = killed_and_rerun
    assert "kept 1 finished member(s): plain8" in rerun.stdout
    assert "plain14: resuming from its checkpoint" in rerun.stdout
    assert "resnet8: starting" in rerun.stdout and "plain8: starting" not in rerun.stdout
    finished = out / "plain8" / "model.safetensors"
    assert finished.read_bytes() == weights and finished.stat().st_mtime_ns == mtime  # untouched
    log = (out / "logs" / "plain14.log").read_text()
    assert log.count("\n=== ") == 2 and "--resume" in log and "resuming" in log and "at epoch 1, step" in log
    assert (out / "logs" / "plain8.log").read_text().count("\n=== ") == 1
    for name in MEMBERS:
        assert (out / name / "summary.json").is_file() and (out / name / "model.safetensors").is_file()


def test_results_hold_every_member_the_paper_and_the_verdict(killed_and_rerun):
    out, _, _, _ = killed_and_rerun
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["members"]] == MEMBERS
    for m in results["members"]:
        summary = json.loads((out / m["name"] / "summary.json").read_text())
        assert m["status"] == "finished" and m["run_dir"] == m["name"]
        assert m["kind"] == ("plain" if m["name"].startswith("plain") else "residual")
        assert m["model"] == ("cifar_plain" if m["kind"] == "plain" else "cifar_resnet")
        assert m["depth"] == int(m["name"].removeprefix("plain").removeprefix("resnet"))
        assert m["model_args"] == {"depth": m["depth"]}
        assert m["test_error"] == pytest.approx(1 - summary["test_accuracy"])
        assert m["wall_seconds"] == summary["wall_seconds"] and m["steps"] == 15
        assert 0 <= m["train_error"] <= 1 and m["curves"]["iterations"] == [15]
        assert m["paper_test_error_percent"] is None and "no table entry" in m["paper_note"]
        config = (out / m["name"] / "config.yaml").read_text()  # the same warm-up for every member
        assert "warmup_epochs: 1.0" in config and "warmup_lr: 0.01" in config and "warmup: linear" in config
    assert results["paper"]["resnet_test_error_percent"] == {
        "20": 8.75,
        "32": 7.51,
        "44": 7.17,
        "56": 6.97,
        "110": 6.43,
        "1202": 7.93,
    }
    assert results["paper"]["plain_test_error_percent"] is None and "Fig. 6" in results["paper"]["source"]
    v = results["verdict"]
    by_name = {m["name"]: m for m in results["members"]}
    assert v["plain"]["shallowest"] == "plain8" and v["plain"]["deepest"] == "plain14"
    gap = by_name["plain14"]["train_error"] - by_name["plain8"]["train_error"]
    assert v["plain"]["difference"] == pytest.approx(gap)
    assert v["degradation_shown"] == (v["plain"]["difference"] > v["tolerance"])
    assert v["residual_avoided_it"] == (v["residual"]["difference"] <= v["tolerance"])
    assert v["summary"].startswith("Degradation ")


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_page_renders_in_a_real_headless_browser(killed_and_rerun, tmp_path):
    out, _, _, _ = killed_and_rerun
    page = (out / "experiment.html").read_text()
    assert "Degradation" in page and "plain14" in page and "http://" not in page and "https://" not in page
    assert page.count("<img ") == page.count('src="data:image/png;base64,') == 1
    png = Image.open(out / "degradation.png")
    assert png.size[0] > 600
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run should install Debian's chromium")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    url = (out / "experiment.html").resolve().as_uri()
    dom = subprocess.run(
        flags + ["--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = dom.stdout[dom.stdout.index("<body") :].split(">", 1)[0]
    assert 'data-images="1/1"' in body and 'data-errors="0"' in body, body
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "rror" in line]
    assert not console_errors, console_errors
    shot = tmp_path / "page.png"
    subprocess.run(
        flags + [f"--screenshot={shot}", "--window-size=1200,1600", url], capture_output=True, timeout=120, check=True
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and a figure, not a blank page


def test_a_second_runner_on_the_same_folder_is_refused(killed_and_rerun, setting):
    out, _, _, command = killed_and_rerun
    with file_lock(out / ".lock"):
        busy = cnnlab(*command[3:], env=setting[2], check=False)
    assert busy.returncode == 2 and "is being run by another 'cnnlab experiment' process" in busy.stderr


def test_printed_commands_run_and_gather_collects_them(setting):
    tmp, root, env = setting
    out = tmp / "printed"
    printed = cnnlab(
        "experiment", "degradation", "--depths", "8,14", "--out", out, *tiny_flags(root), "--print-commands", env=env
    )
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 4 and all(" -m cnnlab train --run-dir " in line for line in lines)
    assert f"--run-dir {out.resolve() / 'plain8'} --model cifar_plain --model-arg depth=8" in lines[0]
    assert "--recipe he2016 --warmup-epochs 1.0 --warmup-lr 0.01 --warmup linear --dataset" in lines[3]
    gather_line = printed.stderr.strip().splitlines()[-1].split(": ", 1)[1]
    assert gather_line.endswith(f"experiment gather {out.resolve()}")
    assert not (out / "plain8").exists()  # nothing trained
    elsewhere = tmp / "elsewhere"  # printed commands hold absolute paths: they run from any folder
    elsewhere.mkdir()
    subprocess.run(shlex.split(lines[0]), env=env, check=True, capture_output=True, timeout=600, cwd=elsewhere)
    partial = subprocess.run(shlex.split(gather_line), env=env, capture_output=True, text=True, timeout=600)
    assert partial.returncode == 1 and "not finished yet: plain14, resnet8, resnet14" in partial.stdout
    results = json.loads((out / "results.json").read_text())
    assert [m["status"] for m in results["members"]] == ["finished", "not started", "not started", "not started"]
    assert results["verdict"]["degradation_shown"] is None and results["verdict"]["summary"].startswith("incomplete")
    # for a cluster: member i on device i mod the list, and on CPU each of N jobs gets cores/N threads
    on_gpus = cnnlab(
        "experiment",
        "degradation",
        "--depths",
        "8,14",
        "--out",
        out,
        *tiny_flags(root),
        "--devices",
        "cuda:0,cuda:1",
        "--print-commands",
        env=env,
    ).stdout.splitlines()
    assert [line.split("--device ")[1].split()[0] for line in on_gpus[1:]] == ["cuda:1", "cuda:0", "cuda:1"]
    assert "--resume" in on_gpus[0]  # plain8 has begun (here: finished): its line resumes it


def test_a_rerun_asking_for_something_else_is_refused(setting):
    tmp, root, env = setting
    out = tmp / "mismatch"
    cnnlab(
        "experiment", "degradation", "--depths", "8,14", "--out", out, *tiny_flags(root), "--print-commands", env=env
    )
    other = cnnlab(
        "experiment",
        "degradation",
        "--depths",
        "8,20",
        "--out",
        out,
        *tiny_flags(root),
        "--print-commands",
        env=env,
        check=False,
    )
    assert other.returncode == 2
    assert (
        f"error: {out} holds a different experiment: depths [8, 14] here, [8, 20] asked for; members plain8, "
        "plain14, resnet8, resnet14 here, plain8, plain20, resnet8, resnet20 asked for"
    ) in other.stderr
    assert "It was made by: cnnlab experiment degradation --depths 8,14" in other.stderr
    assert "Repeat that command to continue it, or choose another --out" in other.stderr
    other = cnnlab(
        "experiment",
        "degradation",
        "--depths",
        "8,14",
        "--out",
        out,
        *tiny_flags(root),
        "--epochs",
        "2",
        "--print-commands",
        env=env,
        check=False,
    )
    assert other.returncode == 2
    assert "plain8's flags here have --epochs 1 where this command gives --epochs 2" in other.stderr
    # how to run is not what to train: other threads or devices continue the same experiment
    same = cnnlab(
        "experiment",
        "degradation",
        "--depths",
        "8,14",
        "--out",
        out,
        *tiny_flags(root, ()),
        "--jobs",
        "2",
        "--print-commands",
        env=env,
    )
    assert all(f"--threads {default_threads(2)}" in line for line in same.stdout.splitlines())


def test_bad_requests_fail_before_any_work(tmp_path, capsys):
    from cnnlab.cli import main

    for args, message in (
        (["--depths", "8,10"], "--depths: 10 not of the form 6n+2"),
        (["--depths", "20"], "give at least two depths"),
        (["--model", "resnet20"], "--model: the degradation experiment trains cifar_plain and cifar_resnet"),
        (["--run-dir", "x"], "--run-dir: each member gets its own folder under --out"),
        (["--lr", "-1"], "lr = -1.0 is invalid"),
        (["--devices", "tpu:0"], "--devices 'tpu:0': expected a list such as cuda:0,cuda:1"),
        (["--device", "cpu", "--devices", "cuda:0"], "give either --device (every member) or --devices"),
    ):
        assert main(["experiment", "degradation", "--out", str(tmp_path / "x"), *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["experiment", "seeds", "--seed", "3", "--out", str(tmp_path / "y")]) == 2
    assert "--seed: give the seeds with --seeds 0,1,2 or --runs N" in capsys.readouterr().err
    assert main(["experiment", "seeds", "--runs", "2", "--seeds", "1,2", "--out", str(tmp_path / "y")]) == 2
    assert "give either --runs N or --seeds 0,1,2, not both" in capsys.readouterr().err
    assert main(["experiment", "gather", str(tmp_path)]) == 2
    assert "not an experiment folder (no experiment.json)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_seed_statistics_on_known_numbers():
    values = [0.93, 0.94, 0.95, 0.96]
    s = seed_statistics(values, threshold=0.94)
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.945)
    assert s["std"] == pytest.approx(statistics.stdev(values)) == pytest.approx(0.0129099, abs=1e-6)  # n - 1
    assert s["at_or_above"] == 3 and s["fraction_at_or_above"] == 0.75
    assert (s["min"], s["max"]) == (0.93, 0.96)
    one = seed_statistics([0.5])
    assert one["std"] is None and one["fraction_at_or_above"] is None


def test_seeds_experiment_runs_each_seed_two_at_a_time(setting):
    tmp, root, env = setting
    out = tmp / "seeds"
    cnnlab(
        "experiment",
        "seeds",
        "--seeds",
        "0,3",
        "--jobs",
        "2",
        "--threshold",
        "0.5",
        "--out",
        out,
        "--model",
        "cnn",
        "--model-arg",
        "spec=c4,p,f8",
        *tiny_flags(root, ()),
        env=env,
    )
    results = json.loads((out / "results.json").read_text())
    accuracies = []
    for run, seed in zip(results["runs"], (0, 3)):
        summary = json.loads((out / f"seed{seed}" / "summary.json").read_text())
        assert run["seed"] == summary["seed"] == seed and run["test_accuracy"] == summary["test_accuracy"]
        assert run["wall_seconds"] == summary["wall_seconds"]
        # two jobs share the cores
        assert f"--threads {default_threads(2)}" in (out / "logs" / f"seed{seed}.log").read_text()
        accuracies.append(summary["test_accuracy"])
    stats = results["test_accuracy"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(accuracies))
    assert stats["std"] == pytest.approx(statistics.stdev(accuracies))
    assert stats["fraction_at_or_above"] == sum(a >= 0.5 for a in accuracies) / 2
    assert "Seeds" in (out / "experiment.html").read_text()


def test_verdict_from_known_numbers():
    def member(name, kind, depth, train_error):
        return {"name": name, "kind": kind, "depth": depth, "train_error": train_error, "test_error": train_error + 0.1}

    degraded = [
        member("plain20", "plain", 20, 0.10),
        member("plain56", "plain", 56, 0.20),
        member("resnet20", "residual", 20, 0.10),
        member("resnet56", "residual", 56, 0.105),
    ]
    v = verdict(degraded, tolerance=0.01)
    assert v["degradation_shown"] is True and v["residual_avoided_it"] is True
    assert v["plain"]["difference"] == pytest.approx(0.10) and v["residual"]["difference"] == pytest.approx(0.005)
    assert v["summary"] == (
        "Degradation showed: plain56 ended at 20.0% training error against plain20's 10.0% "
        "(+10.0 points; tolerance 1.0 points). The ResNets avoided it: resnet56 ended at 10.5% "
        "against resnet20's 10.0% (+0.5 points)."
    )
    flat = [
        member("plain20", "plain", 20, 0.10),
        member("plain56", "plain", 56, 0.105),
        member("resnet20", "residual", 20, 0.10),
        member("resnet56", "residual", 56, 0.30),
    ]
    v = verdict(flat, tolerance=0.01)
    assert v["degradation_shown"] is False and v["residual_avoided_it"] is False
    assert "did not show" in v["summary"] and "degraded too" in v["summary"]


def test_paper_table_and_depths():
    assert PAPER_TEST_ERROR == {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
    assert parse_depths("56,20,8") == [8, 20, 56]
    with pytest.raises(ConfigError, match="14, 20"):
        parse_depths("16,20")


def test_the_warmup_recipe_warms_every_model_up_and_travels_as_train_flags():
    for model in ("plain20", "resnet56", "cifar_plain"):
        cfg = apply_recipe(TrainConfig(model=model), "he2016_warmup")
        assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.warmup, cfg.lr) == (1.0, 0.01, "linear", 0.1)
        assert cfg.milestones == [0.5, 0.75] and cfg.milestone_unit == "fraction"
    assert apply_recipe(TrainConfig(model="resnet56"), "he2016").warmup_epochs == 0.0  # he2016 itself unchanged
    assert recipe_args("he2016_warmup") == [
        "--recipe",
        "he2016",
        "--warmup-epochs",
        "1.0",
        "--warmup-lr",
        "0.01",
        "--warmup",
        "linear",
    ]
    assert recipe_args("he2016_warmup", skip={"warmup_epochs"}) == [
        "--recipe",
        "he2016",
        "--warmup-lr",
        "0.01",
        "--warmup",
        "linear",
    ]


def test_generic_builders_take_any_depth():
    from cnnlab.models import create_model

    plain, residual = create_model("cifar_plain", depth=8), create_model("cifar_resnet", depth=14)
    assert plain.shortcut is None and plain.depth == 8 and residual.shortcut == "A" and residual.depth == 14
    assert sum(p.numel() for p in create_model("cifar_resnet", depth=56).parameters()) == 853_018
