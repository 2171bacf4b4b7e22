"""`cnnlab serve`: a real server process on 127.0.0.1, talked to over HTTP with requests: good images, a
batch, bad files of every kind (each a clear 4xx, the server answering after), concurrent clients, the OpenAPI
description, a clean stop on SIGTERM; and the live page in headless Chromium."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_explain import image_files, weights_folder  # noqa: E402
from test_fuzz import _png_claiming  # noqa: E402
from test_viz_page import _shot, browser  # noqa: E402,F401

from cnnlab.cli import main  # noqa: E402

LIMIT_MB = 0.05  # a small upload limit, so that a test can go over it cheaply


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    """One cnnlab cache for this module's servers and tests: inference measures the CPU once, not per test."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _shared_cache(private_cache, probe_cache, monkeypatch):
    monkeypatch.setenv("CNNLAB_CACHE", str(probe_cache))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, probe_cache):
    tmp = tmp_path_factory.mktemp("serve")
    folder = weights_folder(tmp / "convnet", "convnet")
    port = free_port()
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "serve", str(folder), "--port", str(port), "--max-upload-mb", str(LIMIT_MB)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "CNNLAB_CACHE": str(probe_cache)},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(base + "/healthz", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"the server did not start:\n{log.read()}")
        time.sleep(0.2)
    yield base, folder, tmp, proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def alive(base: str) -> bool:
    return requests.get(base + "/healthz", timeout=10).json() == {"status": "ok"}


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def test_a_good_image_gives_what_cnnlab_predict_gives(server, capsys):
    base, folder, tmp, _, _ = server
    path = image_files(tmp / "images", 1)[0]
    answer = requests.post(
        base + "/v1/predict", files=[("files", (path.name, path.read_bytes(), "image/png"))], timeout=60
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert main(["predict", str(folder), str(path), "--json", "--precision", "fp32"]) == 0  # the server's
    cli = json.loads(capsys.readouterr().out)
    assert body["skipped"] == [] and len(body["results"]) == 1
    got, want = body["results"][0], cli["results"][0]
    assert got["file"] == path.name and got["notes"] == want["notes"]
    assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
    assert [t["probability"] for t in got["top"]] == pytest.approx([t["probability"] for t in want["top"]], abs=1e-6)


def test_a_batch_with_a_bad_file_reports_it_by_name(server):
    base = server[0]
    files = [
        ("files", ("a.png", png_bytes(1), "image/png")),
        ("files", ("notes.txt", b"hello", "text/plain")),
        ("files", ("b.png", png_bytes(2), "image/png")),
    ]
    body = requests.post(base + "/v1/predict", files=files, params={"top_k": 2}, timeout=60).json()
    assert [r["file"] for r in body["results"]] == ["a.png", "b.png"] and len(body["results"][0]["top"]) == 2
    assert len(body["skipped"]) == 1 and body["skipped"][0]["file"] == "notes.txt"
    assert (
        body["skipped"][0]["error"].startswith("notes.txt: not a readable image")
        and body["skipped"][0]["status"] == 400
    )
    assert "cnnlab-serve-" not in json.dumps(body)  # no server path leaks into an answer


@pytest.mark.parametrize(
    "name,data,status,message",
    [
        ("cut.png", png_bytes(3)[:300], 400, "cut.png: not a readable image"),
        ("words.jpg", b"this is not a picture" * 10, 400, "words.jpg: not a readable image"),
        ("big.png", b"\0" * int(LIMIT_MB * 1e6 + 1), 413, "big.png: over the upload limit of 50,000 bytes"),
        ("bomb.png", _png_claiming(9_000, 9_000), 413, "bomb.png: claims 9000x9000 pixels, more than cnnlab opens"),
        ("huge.png", _png_claiming(100_000, 100_000), 413, "huge.png: too many pixels"),  # Pillow's own limit first
    ],
)
def test_bad_files_get_a_clear_4xx_and_the_server_keeps_answering(server, name, data, status, message):
    base = server[0]
    answer = requests.post(base + "/v1/predict", files=[("files", (name, data, "image/png"))], timeout=60)
    assert answer.status_code == status, answer.text
    skipped = answer.json()["detail"]["skipped"]
    assert skipped[0]["file"] == name and skipped[0]["error"].startswith(message), skipped
    assert alive(base)


def test_a_body_over_the_request_limit_is_refused_before_it_is_parsed(server):
    base = server[0]
    huge = b"\0" * (64 * (int(LIMIT_MB * 1e6) + 4096) + 1)
    answer = requests.post(base + "/v1/predict", files=[("files", ("huge.png", huge, "image/png"))], timeout=60)
    assert answer.status_code == 413 and "over the limit of" in answer.json()["detail"]
    empty = requests.post(base + "/v1/predict", timeout=30)
    assert empty.status_code == 422  # no files: FastAPI names the missing field
    assert alive(base)


def test_model_health_and_openapi(server):
    base = server[0]
    model = requests.get(base + "/v1/model", timeout=10).json()
    assert model["model"] == "convnet" and model["classes"] == [f"class {i}" for i in range(10)]
    assert model["input_shape"] == [3, 32, 32] and model["preprocessing"]["mean"] == [0.5] * 3
    assert model["limits"]["max_upload_bytes"] == 50_000 and model["version"]
    spec = requests.get(base + "/openapi.json", timeout=10).json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert requests.get(base + "/docs", timeout=10).status_code == 200
    page = requests.get(base + "/", timeout=10).text
    assert 'data-live="true"' in page and "connect-src 'self'" in page


def test_concurrent_clients_are_queued_not_dropped(server):
    base = server[0]
    files = [png_bytes(k) for k in range(4)]

    def one(k: int) -> int:
        return requests.post(
            base + "/v1/predict", files=[("files", (f"{k}.png", files[k % 4], "image/png"))], timeout=120
        ).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48
    assert alive(base)


def test_served_page_takes_an_upload_and_shows_predicts_class(server, browser, tmp_path):  # noqa: F811  (the imported fixture)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, folder, tmp = server[:3]
    path = image_files(tmp / "upload", 1, seed=5)[0]
    browser.get(base + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.TAG_NAME, "html").get_attribute("data-ready"))
    browser.find_element(By.ID, "upload").send_keys(str(path))
    status = browser.find_element(By.ID, "live-status")
    WebDriverWait(browser, 60).until(lambda d: status.get_attribute("data-cls") is not None)
    want = requests.post(
        base + "/v1/predict", files=[("files", (path.name, path.read_bytes(), "image/png"))], timeout=60
    ).json()["results"][0]["top"][0]["class"]
    assert status.get_attribute("data-cls") == want
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("data-image") == "1"  # the upload is shown
    browser.find_element(By.ID, "map-0-0").click()
    assert browser.find_element(By.ID, "detail-section").get_attribute("data-layer") == "0"
    _shot(browser.find_element(By.ID, "images-section"), "serve-upload.png", tmp_path)
    # dropped on the box, and pasted: the same request from the page's other two ways in
    import base64

    png = base64.b64encode(path.read_bytes()).decode()
    for event in ("drop", "paste"):
        browser.execute_script(
            """
            const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], arguments[1] + '.png', {type: 'image/png'}));
            const e = arguments[1] === 'drop' ? new DragEvent('drop', {dataTransfer: data, bubbles: true})
                                              : new ClipboardEvent('paste', {clipboardData: data, bubbles: true});
            (arguments[1] === 'drop' ? document.getElementById('drop') : document).dispatchEvent(e);""",
            png,
            event,
        )
        WebDriverWait(browser, 60).until(lambda d, event=event: status.text.startswith(f"{event}.png: "))
        assert status.get_attribute("data-cls") == want
    # a file that is not an image: refused on the page with the server's reason
    bad = tmp_path / "note.png"
    bad.write_bytes(b"not an image at all")
    browser.find_element(By.ID, "upload").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: status.text.startswith("refused:"))
    assert "note.png: not a readable image" in status.text
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("data-mismatches") is None


def start(target, port: int, *extra) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "serve", str(target), "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the server did not start: {proc.communicate()[0]}")


@pytest.mark.slow  # a training run and a second server: about 6 s idle, 30 s on a busy 2-core machine
def test_a_run_folder_offers_its_test_images(tmp_path, image_folder):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "imagefolder",
                "--data-dir",
                str(image_folder),
                "--model",
                "cnn",
                "--model-arg",
                "spec=c4,p,f16",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--run-dir",
                str(run),
                "--progress",
                "plain",
                "--no-report",
            ]
        )
        == 0
    )
    port = free_port()
    proc = start(run, port)
    try:
        base = f"http://127.0.0.1:{port}"
        page = requests.get(base + "/", timeout=30).text
        data = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
        assert len(data["test_images"]) == 16 and data["test_images"][0].startswith("test image ")
        answer = requests.post(base + "/v1/explain", data={"test_index": "3"}, timeout=60)
        assert answer.status_code == 200, answer.text
        image = answer.json()["image"]
        assert image["name"] == data["test_images"][3] and image["label"] in range(3)
        assert set(image["acts"]) >= {layer["id"] for layer in data["layers"] if "same_as" not in layer}
        missing = requests.post(base + "/v1/explain", data={"test_index": "99"}, timeout=30)
        assert missing.status_code == 404 and "no test image 99; there are 16" in missing.text
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0 and out.rstrip().endswith("stopped (SIGINT)"), out


def test_sigterm_stops_the_server_cleanly(tmp_path):
    folder = weights_folder(tmp_path / "w", "convnet")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "serve", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "serving convnet on http://127.0.0.1:" in out and out.rstrip().endswith("stopped (SIGTERM)")
    with pytest.raises(requests.ConnectionError):
        requests.get(base + "/healthz", timeout=2)


def test_other_hosts_are_warned_about(tmp_path, monkeypatch):
    import uvicorn

    from cnnlab.inference.weights import load_weights
    from cnnlab.serve import serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # nothing is bound: only the messages matter
    lines = []
    serve(load_weights(weights_folder(tmp_path / "w", "convnet")), host="0.0.0.0", port=9, log=lines.append)
    assert lines[0].startswith(
        "warning: listening on 0.0.0.0: anyone who can reach this address can use the model; there is no authentication"
    )
    lines.clear()
    serve(load_weights(tmp_path / "w"), host="127.0.0.1", port=9, log=lines.append)
    assert not any(line.startswith("warning") for line in lines)
