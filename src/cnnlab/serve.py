"""`cnnlab serve`: the explain page live, and a JSON prediction API, on FastAPI served by uvicorn.

The model is loaded once. Every forward pass (predict or explain) runs under one lock, in the worker threads
FastAPI gives plain `def` endpoints: concurrent requests queue for the model instead of racing on it. Uploads
are read through the same guarded opener as every other image (`cnnlab.data.images.open_image`, by way of
`cnnlab.inference.predict`), so the pixel, mode and decoding limits are the ones `cnnlab predict` applies; the
request body is counted as it arrives and refused past `max_upload_bytes` per file times `max_files`.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations as objects, and fastapi is
# imported inside create_app (an optional extra), where string annotations could not be resolved

import copy
import ipaddress
import re
import signal
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .data.images import MAX_IMAGE_PIXELS
from .errors import CnnlabError, ConfigError

__all__ = ["create_app", "serve", "MAX_UPLOAD_BYTES", "MAX_FILES"]

MAX_UPLOAD_BYTES = 20 << 20  # per file: a large photograph; the pixel limit of open_image applies after it
MAX_FILES = 64  # per request: a batch, not a dataset (use 'cnnlab predict' for folders)
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


class _BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 as soon as it is that large, whatever
    its Content-Length says (or whether it says anything)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(seen)
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge as exc:
            if not started:
                await self._refuse(send, exc.size)

    async def _refuse(self, send, size: int):
        import json

        body = json.dumps(
            {
                "detail": f"request body of {size:,}+ bytes is over the limit of {self.limit:,} bytes "
                f"({MAX_FILES} files of at most {MAX_UPLOAD_BYTES:,} bytes); send fewer or "
                "smaller files"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


def _status_for(error: str) -> int:
    """413 for what is too large (bytes or pixels), 400 for what is not a readable image."""
    return 413 if "more than cnnlab opens" in error or "too many pixels" in error or "too large" in error else 400


def create_app(
    loaded,
    *,
    test_images: tuple[list[np.ndarray], list[str], list[int]] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_files: int = MAX_FILES,
    cam_layer: str | None = None,
):
    """The FastAPI app for a loaded model (`cnnlab.inference.weights.LoadedModel`); `test_images` (pixels, names,
    labels) are offered on the page to pick from."""
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import HTMLResponse

    from .inference.predict import load_image, predict_files
    from .viz.explain import explain_data, explain_html

    lock = threading.Lock()  # one forward pass at a time: the model, its hooks and its memory are shared
    # the page's copy: predict_files prepares its model under inference_mode, after which the weights can no
    # longer enter the autograd graph Grad-CAM needs
    explained = copy.copy(loaded)
    explained.model = copy.deepcopy(loaded.model)
    app = FastAPI(
        title="cnnlab serve",
        version=__version__,
        description=f"Predictions and the explain page for {loaded.meta['model']} ({loaded.path}).",
    )
    pictures, names, labels = test_images or ([], [], [])
    with lock:
        if pictures:
            start = explain_data(explained, pictures[:4], names[:4], labels[:4], cam_layer=cam_layer)
        else:  # no test split at hand: a mid-grey image fixes the page's layout until the first upload
            grey: Any = np.full(loaded.input_shape, 128, dtype=np.uint8)  # the name is reused for a PIL image below
            start = explain_data(explained, [grey], ["grey image"], cam_layer=cam_layer)
    cap = start["cap"]
    with tempfile.TemporaryDirectory(prefix="cnnlab-serve-") as tmp, lock:
        # one prediction before the first request: inference settles its runtime once (a measured CPU probe, cached
        # for later runs), which the first client would otherwise wait for
        from PIL import Image

        grey = Image.new("L" if loaded.input_shape[0] == 1 else "RGB", loaded.input_shape[:0:-1], 128)
        grey.save(Path(tmp) / "warm-up.png")
        predict_files(loaded, [Path(tmp) / "warm-up.png"], top_k=1, precision="fp32")
    start["test_images"] = list(names)
    page = explain_html(start, live=True)

    def read_uploads(files: Sequence[UploadFile], folder: Path) -> tuple[list[Path], dict[Path, str], list[dict]]:
        paths, original, bad = [], {}, []
        for k, upload in enumerate(files):
            name = upload.filename or f"file {k}"
            data = upload.file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                bad.append(
                    {
                        "file": name,
                        "error": f"{name}: over the upload limit of {max_upload_bytes:,} bytes; send a smaller file",
                        "status": 413,
                    }
                )
                continue
            suffix = Path(name).suffix
            path = folder / f"{k:04d}{suffix if _SAFE_SUFFIX.match(suffix) else ''}"
            path.write_bytes(data)
            paths.append(path)
            original[path] = name
        return paths, original, bad

    def renamed(text: str, original: dict[Path, str]) -> str:
        for path, name in original.items():
            text = text.replace(str(path), name)
        return text

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the model is loaded and the server answers."""
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info() -> dict:
        """The model, its classes and the preprocessing every request goes through."""
        return {
            "model": loaded.meta["model"],
            "model_args": loaded.meta.get("model_args", {}),
            "classes": loaded.classes,
            "input_shape": list(loaded.input_shape),
            "preprocessing": loaded.preprocess.to_dict(),
            "weights": str(loaded.path.name),
            "version": __version__,
            "limits": {
                "max_upload_bytes": max_upload_bytes,
                "max_files": max_files,
                "max_image_pixels": MAX_IMAGE_PIXELS,
            },
        }

    # B008: File()/Form() as a default is FastAPI's way to declare where a parameter comes from, not a shared value
    @app.post("/v1/predict")
    def predict(files: list[UploadFile] = File(..., description="one or more image files"), top_k: int = 3) -> dict:  # noqa: B008
        """Top-k classes of each file, as `cnnlab predict --json` gives them; unreadable files are listed in
        `skipped` with the reason. 400 (or 413 for a file over a limit) when no file could be classified."""
        if len(files) > max_files:
            raise HTTPException(
                413, f"{len(files)} files in one request, over the limit of {max_files}; send them in several requests"
            )
        if top_k < 1:
            raise HTTPException(422, f"top_k={top_k}: give 1 or more classes to show")
        with tempfile.TemporaryDirectory(prefix="cnnlab-serve-") as tmp:
            paths, original, too_large = read_uploads(files, Path(tmp))
            with lock:
                # fp32 always: one answer per image, whatever a speed probe would pick (and as the page computes)
                results, bad = predict_files(loaded, paths, top_k=top_k, precision="fp32") if paths else ([], [])
        for r in results:
            r["file"] = original[Path(r["file"])]
        skipped = too_large + [
            {
                "file": original[Path(b["file"])],
                "error": renamed(b["error"], original),
                "status": _status_for(b["error"]),
            }
            for b in bad
        ]
        if not results:
            statuses = {s["status"] for s in skipped}
            raise HTTPException(413 if statuses == {413} else 400, {"results": [], "skipped": skipped})
        return {"results": results, "skipped": skipped}

    @app.post("/v1/explain", include_in_schema=False)
    def explain(file: UploadFile | None = File(None), test_index: int | None = Form(None)) -> dict:  # noqa: B008 (as above)
        """One more image for the live page: everything the page shows, from the server's forward pass."""
        image_labels: list[int | None]
        if test_index is not None:
            if not 0 <= test_index < len(pictures):
                raise HTTPException(404, f"no test image {test_index}; there are {len(pictures)}")
            images, image_names, image_labels = [pictures[test_index]], [names[test_index]], [labels[test_index]]
        elif file is not None:
            with tempfile.TemporaryDirectory(prefix="cnnlab-serve-") as tmp:
                paths, original, too_large = read_uploads([file], Path(tmp))
                if too_large:
                    raise HTTPException(413, too_large[0]["error"])
                from .errors import ImageError

                try:
                    images = [load_image(paths[0], loaded.preprocess)[0]]
                except ImageError as exc:
                    error = renamed(str(exc), original)
                    raise HTTPException(_status_for(error), error) from None
            image_names, image_labels = [file.filename or "upload"], [None]
        else:
            raise HTTPException(422, "send an image as 'file' or pick one with 'test_index'")
        with lock:
            data = explain_data(explained, images, image_names, image_labels, cam_layer=cam_layer, cap=cap)
        return {"image": data["images"][0]}

    body_limit = max_files * (max_upload_bytes + 4096)  # multipart headers of each part
    return _BodyLimit(app, body_limit), app


def serve(loaded, host: str = "127.0.0.1", port: int = 8000, log=print, **options) -> None:
    """Run the app under uvicorn until Ctrl-C or SIGTERM (uvicorn finishes the requests in flight, then stops)."""
    import uvicorn

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log(
            f"warning: listening on {host}: anyone who can reach this address can use the model; there is no "
            "authentication (the default, 127.0.0.1, answers this machine only)"
        )
    asgi, _ = create_app(loaded, **options)
    config = uvicorn.Config(asgi, host=host, port=port, log_level="warning", workers=1, access_log=False)
    server = uvicorn.Server(config)
    log(
        f"serving {loaded.meta['model']} on http://{host}:{port}/ (API: /v1/predict, /v1/model, /healthz; "
        f"OpenAPI: /docs, /openapi.json); Ctrl-C stops"
    )
    # uvicorn catches SIGINT and SIGTERM, finishes the requests in flight, then raises the signal again for the
    # handler it found: this one takes it as the end of a clean stop (not a KeyboardInterrupt, not a kill)
    received: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, lambda s, frame: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
        if main_thread
        else {}
    )
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("stopped" + (f" ({signal.Signals(received[0]).name})" if received else ""))


def serve_command(args) -> int:
    """`cnnlab serve RUN|WEIGHTS [--host] [--port]`: load the model once and serve the page and the API."""
    import sys

    from .inference.weights import load_weights
    from .run import is_run_folder

    loaded = load_weights(args.target, "cpu", model_name=args.model)
    test_images = None
    if is_run_folder(args.target):
        from .viz.explain import pick_test_images

        try:
            test_images = pick_test_images(
                args.target, loaded, 16, args.data_dir, log=lambda m: print(m, file=sys.stderr)
            )
        except CnnlabError as exc:  # the page still takes uploads
            print(f"note: no test images to pick on the page ({exc})", file=sys.stderr)
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: give a positive size in MB")
    serve(
        loaded,
        args.host,
        args.port,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        test_images=test_images,
        cam_layer=args.layer,
        max_upload_bytes=int(args.max_upload_mb * 1e6),
    )
    return 0
