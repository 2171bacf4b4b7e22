"""`cnnlab serve` under load: the latency of POST /v1/predict for resnet20 (the packaged CIFAR-10 weights) on one
32x32 PNG against in-process `predict_files` on the same file (what `cnnlab predict` runs), in the same run; then
16 concurrent clients for 60 s: requests served per second, failed requests, and the server's resident memory.

The server is a real `cnnlab serve` process on 127.0.0.1 with uvicorn; the clients are threads of this process
with one `requests` session each, so they share the CPU with the server (stated in the conditions).
Run: python bench/serve.py [--seconds 60] [--requests 200]. Goal: p50 latency under 2x in-process.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import conditions
from PIL import Image

from cnnlab.inference.predict import predict_files
from cnnlab.inference.weights import load_weights

WEIGHTS = "resnet20-cifar10"
CLIENTS = 16
GOAL = 2.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, threads: int) -> subprocess.Popen:
    import requests

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": str(threads),
    }  # torch's intra-op threads in the server, as in this process
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "serve", WEIGHTS, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server stopped: {proc.stderr.read().decode()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /healthz within 120 s")


def main(seconds: float = 60, n: int = 200, threads: int = 1) -> bool:
    import requests
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "one.png"
        path.write_bytes(png)
        loaded = load_weights(WEIGHTS)
        port = free_port()
        proc = start_server(port, threads)
        try:
            url = f"http://127.0.0.1:{port}/v1/predict"
            session = requests.Session()
            local, remote = [], []
            # interleaved, one call of each in turn, so that a busy moment of the machine hits both alike
            for k in range(n + 10):  # the first 10 of each warm up
                start = time.perf_counter()
                predict_files(loaded, [path], top_k=3, precision="fp32")
                middle = time.perf_counter()
                answer = session.post(url, files=[("files", ("one.png", png, "image/png"))], timeout=60)
                end = time.perf_counter()
                assert answer.status_code == 200, answer.text
                if k >= 10:
                    local.append(middle - start)
                    remote.append(end - middle)

            # 16 clients for `seconds`: every answer must be a 200
            served, failed, lock, stop = [0], [0], threading.Lock(), threading.Event()
            memory = [rss_mb(proc.pid)]

            def client():
                s = requests.Session()
                while not stop.is_set():
                    try:
                        ok = (
                            s.post(url, files=[("files", ("one.png", png, "image/png"))], timeout=60).status_code == 200
                        )
                    except requests.RequestException:
                        ok = False
                    with lock:
                        (served if ok else failed)[0] += 1

            threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
            begin = time.perf_counter()
            for t in threads:
                t.start()
            while time.perf_counter() - begin < seconds:
                time.sleep(1)
                memory.append(rss_mb(proc.pid))
            stop.set()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - begin
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    p50_local, p99_local = percentile(local, 50) * 1e3, percentile(local, 99) * 1e3
    p50_remote, p99_remote = percentile(remote, 50) * 1e3, percentile(remote, 99) * 1e3
    ratio = p50_remote / p50_local
    settled = memory[len(memory) // 4 :]  # after the first quarter: buffers and thread pools have grown
    growth = (max(settled) - settled[0]) / settled[0]
    print(
        f"serve bench: {conditions(dtype='fp32', model=WEIGHTS, image='one 32x32 PNG', repeats=n, server='cnnlab serve (uvicorn, 1 process) on 127.0.0.1', clients=f'{CLIENTS} threads of the bench process, on the same CPU')}"
    )
    print(
        f"  in-process predict_files: p50 {p50_local:.2f} ms, p99 {p99_local:.2f} ms over {n} calls "
        "(interleaved with the requests below)"
    )
    print(
        f"  POST /v1/predict:         p50 {p50_remote:.2f} ms, p99 {p99_remote:.2f} ms over {n} requests "
        f"(one client); p50 ratio {ratio:.2f}x (goal < {GOAL:g}x)"
    )
    print(
        f"  {CLIENTS} clients for {elapsed:.0f} s: {served[0] / elapsed:.1f} requests/s served, {failed[0]} failed; "
        f"server RSS {memory[0]:.0f} MB at start, {settled[0]:.0f} -> {settled[-1]:.0f} MB "
        f"(max {max(settled):.0f}) after warm-up, {100 * growth:+.1f}%"
    )
    met = ratio < GOAL and failed[0] == 0 and growth < 0.10
    print(f"  {'met' if met else 'NOT met'}: ratio < {GOAL:g}x, no failed request, memory within 10% after warm-up")
    return met


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the server and in-process (default "
        "1: on a shared 2-core machine more threads make both wait on each other's spinning)",
    )
    args = parser.parse_args()
    raise SystemExit(0 if main(args.seconds, args.requests, args.threads) else 1)
