"""Training on several processes through torchrun (gloo on CPU): the global batch split over ranks, rank 0
alone writing, restarts after a killed worker, two agents meeting over a c10d rendezvous, and a SIGTERM to
the agent."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from conftest import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("ddp") / "shapes", per_class=(48, 10))


def train_args(root, run, *extra):
    return [
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(root),
        "--model",
        "convnet",
        "--batch-size",
        "16",
        "--precision",
        "fp32",
        "--channels-last",
        "off",
        "--run-dir",
        str(run),
        "--no-report",
        "--augment",
        "crop:2:reflect,flip",
        *extra,
    ]


def env_for(tmp_path, **extra):
    return {**os.environ, "CNNLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def weights(run):
    return load_file(Path(run) / "model.safetensors")


def test_two_ranks_end_with_the_one_process_weights_and_accuracy(shapes, tmp_path):
    env = env_for(tmp_path)
    one = subprocess.run(
        [sys.executable, "-m", "cnnlab", *train_args(shapes, tmp_path / "one", "--epochs", "1", "--threads", "1")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        torchrun(
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cnnlab",
            *train_args(shapes, tmp_path / "two", "--epochs", "1"),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:  # same global batches, gradients averaged over ranks: equal up to float rounding
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4 * a[k].abs().max().item()), k
    import json

    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s1["test_accuracy"] == s2["test_accuracy"] and s2["world_size"] == 2 and s2["backend"] == "gloo"
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2, rows  # a header and one row for the one epoch, not one per rank
    assert two.stdout.count("test accuracy:") == 1  # only rank 0 reports


def test_a_batch_the_ranks_cannot_share_is_refused(shapes, tmp_path):
    result = subprocess.run(
        torchrun(
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cnnlab",
            *train_args(shapes, tmp_path / "run", "--epochs", "1", "--batch-size", "15"),
        ),
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "batch_size 15 cannot be split over 2 processes" in result.stderr


def _rank_pids(agent_pid: int) -> dict[int, int]:
    """RANK -> pid of the agent's worker processes."""
    ranks = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            environ = dict(
                item.split("=", 1)
                for item in (child / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
            ranks[int(environ["RANK"])] = int(child.name)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return ranks


def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_bitwise_as_if_never_killed(shapes, tmp_path):
    env = env_for(tmp_path)
    common = ("--epochs", "3", "--checkpoint-every", "2", "--progress", "plain", "--log-every", "1")
    reference = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnnlab",
            "train",
            "--nproc-per-node",
            "2",
            *train_args(shapes, tmp_path / "reference", *common)[1:],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert reference.returncode == 0, reference.stderr
    run = tmp_path / "run"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnnlab",
            "train",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "2",
            *train_args(shapes, run, *common)[1:],
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        killed = None
        for line in agent.stdout:  # rank 0's progress: kill rank 1 inside step 11 (of 27), after a checkpoint
            if line.startswith("step 10/") and killed is None:
                pids = _rank_pids(agent.pid)
                os.kill(pids[1], signal.SIGKILL)
                killed = pids[1]
        agent.wait(timeout=600)
    finally:
        agent.kill()
    assert killed is not None
    assert agent.returncode == 0
    a, b = weights(tmp_path / "reference"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((run / "metrics.csv").read_text().splitlines()) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def test_two_agents_over_a_c10d_rendezvous_write_one_run_folder_from_rank_0_alone(shapes, tmp_path):
    port = _free_port()
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for node in nodes:
        node.mkdir()
        env = env_for(node)  # each node its own cache folder, which must stay empty on the non-zero rank
        procs.append(
            subprocess.Popen(
                torchrun(
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--rdzv-backend",
                    "c10d",
                    "--rdzv-endpoint",
                    f"127.0.0.1:{port}",
                    "--rdzv-id",
                    "cnnlab-test",
                    "-m",
                    "cnnlab",
                    *train_args(shapes, "run", "--epochs", "1"),
                ),
                cwd=node,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    made = [n for n in nodes if (n / "run").exists()]
    assert len(made) == 1, [_files(n) for n in nodes]
    writer = made[0]
    other = nodes[1 - nodes.index(writer)]
    assert _files(other) == set(), f"rank 1 wrote {_files(other)}"
    assert {"config.yaml", "metrics.csv", "last.ckpt", "model.safetensors", "model.json", "summary.json"} <= {
        p.name for p in (writer / "run").iterdir()
    }


def test_sigterm_to_the_agent_checkpoints_and_stops_every_rank(shapes, tmp_path):
    run = tmp_path / "run"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnnlab",
            "train",
            "--nproc-per-node",
            "2",
            *train_args(
                shapes, run, "--epochs", "5000", "--schedule", "constant", "--progress", "plain", "--log-every", "1"
            )[1:],
        ],
        env=env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in agent.stdout:
            lines.append(line)
            if line.startswith("step 4/"):
                agent.send_signal(signal.SIGTERM)
                break
        rest, _ = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert agent.returncode == 143, "".join(lines) + rest
    assert f"cnnlab train --resume {run}" in rest
    from cnnlab.training.checkpoint import read_checkpoint

    state = read_checkpoint(run / "last.ckpt")
    assert state["step"] >= 4 and state["world_size"] == 2 and len(state["rng"]) == 2
    time.sleep(0.5)
    assert not _rank_pids(agent.pid)  # no worker left behind


def test_resuming_at_another_world_size_continues_and_says_it_is_not_bitwise(shapes, tmp_path):
    env = env_for(tmp_path)
    first = subprocess.run(
        torchrun(
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cnnlab",
            *train_args(shapes, tmp_path / "run", "--epochs", "1", "--schedule", "constant"),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    again = subprocess.run(
        [sys.executable, "-m", "cnnlab", "train", "--resume", str(tmp_path / "run"), "--epochs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    assert "checkpointed by 2 process(es) and resumes with 1" in again.stdout and "not bit for bit" in again.stdout
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 3


def test_each_torchrun_attempt_meets_under_its_own_store_prefix(monkeypatch):
    """A restarted rank once read the killed rank's address from the agent's store (a prefix shared by every
    attempt) and hung connecting to it: each attempt after the first now keeps its keys apart."""
    import datetime

    import torch.distributed as dist

    from cnnlab.training.runtime import _restart_store

    server = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False
    )
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    env = {"rank": 0, "world_size": 2, "local_world_size": 2, "restart_count": 1}
    timeout = datetime.timedelta(seconds=10)
    assert _restart_store({**env, "restart_count": 0}, timeout) == {}  # the first attempt: torch's own way
    assert _restart_store({**env, "local_world_size": 1}, timeout) == {}  # several agents: torch's own way
    first, second = _restart_store(env, timeout), _restart_store({**env, "restart_count": 2}, timeout)
    assert (first["rank"], first["world_size"]) == (0, 2)
    server.set("0", "the killed attempt's address")  # what a rank of attempt 0 left in the shared store
    first["store"].set("0", "attempt 1's address")
    assert first["store"].get("0") == b"attempt 1's address"
    assert not second["store"].check(["0"])  # attempt 2 sees neither of the earlier addresses
    assert server.get("0") == b"the killed attempt's address"


def test_lr_find_under_two_ranks_decides_once_and_trains_every_rank_with_it(shapes, tmp_path):
    """The ranks average their losses, so they stop the range test at the same step (a rank that stopped alone
    would leave the others waiting in DDP's all-reduce); rank 0 reports once and its suggestion is the run's lr."""
    import json

    env = env_for(tmp_path)
    two = subprocess.run(
        torchrun(
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "cnnlab",
            *train_args(shapes, tmp_path / "two", "--epochs", "1", "--lr", "find", "--optimizer", "adamw"),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["lr_find"]["suggested"] == summary["lr"]
    assert (tmp_path / "two" / "lr_find.png").is_file() and two.stdout.count("lr finder:") == 1
