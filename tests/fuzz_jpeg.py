"""The JPEG decoders as a fuzzing target of their own: structure-aware mutations of seed JPEGs (baseline,
progressive, arithmetic, restart markers, every chroma subsampling, greyscale, CMYK, YCCK, EXIF rotations) fed to
every decode path (the region decoder called directly with hostile boxes and scales, decode_crop through the
region decoder, simplejpeg and Pillow, and open_image), each batch in a child process so that a crash is caught.

    python tests/fuzz_jpeg.py --inputs 5000 [--seed N] [--batch 250] [--out DIR]

Every input must give a well-formed result or the path's own error (ImageError; ValueError from the C entry
point), each decode call within CPU_SECONDS. A crash is replayed input by input to find the one that crashed; it and every other
finding are written to DIR (default: fuzz-findings/) as .jpg files, to be pinned in tests/test_fuzz.py. The
input of index i of seed s is a pure function of (s, i): `--replay s:i` runs that one input in this process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
CPU_SECONDS = 1.0  # per decode call
SUBSAMPLINGS = {
    "4:4:4": "1x1",
    "4:2:2": "2x1",
    "4:2:0": "2x2",
    "4:4:0": "1x2",
    "4:1:1": "4x1",
    "4:1:0": "4x2",
    "3x2": "3x2",
}


def _picture(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 5 + seed) * 90, np.cos(y / 4) * 90, ((x * y) % 97) * 1.0], axis=-1) + 128
    return (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


def _pillow(pixels: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=85, **options)
    return buffer.getvalue()


def _cjpeg(pixels: np.ndarray, *options: str) -> bytes | None:
    if shutil.which("cjpeg") is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PPM")
    done = subprocess.run(["cjpeg", "-quality", "85", *options], input=buffer.getvalue(), capture_output=True)
    return done.stdout if done.returncode == 0 else None


def _ycck(cmyk: bytes) -> bytes:
    """A CMYK JPEG whose Adobe marker says YCCK (transform 2): what decoders then read as YCCK."""
    at = cmyk.find(b"\xff\xeeAdobe")
    if at < 0:
        return cmyk
    data = bytearray(cmyk)
    data[at + 4 + 11] = 2  # APP14: "Adobe", version (2), flags0 (2), flags1 (2), transform (1)
    return bytes(data)


def seeds() -> dict[str, bytes]:
    """One small JPEG of each kind the decoders must handle."""
    rgb, odd = _picture(48, 40, 1), _picture(37, 29, 2)
    out = {
        "baseline": _pillow(rgb),
        "progressive": _pillow(rgb, progressive=True),
        "restart": _pillow(rgb, restart_marker_blocks=1),
        "grey": _pillow(rgb, "L"),
        "grey progressive": _pillow(odd, "L", progressive=True),
        "cmyk": _pillow(rgb, "CMYK"),
        "odd size 4:4:4": _pillow(odd, subsampling=0),
    }
    out["ycck"] = _ycck(out["cmyk"])
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        out[f"exif {orientation}"] = _pillow(odd, exif=exif.tobytes())
    for name, sample in SUBSAMPLINGS.items():
        for extra, flags in (("", ()), (" progressive", ("-progressive",))):
            data = _cjpeg(odd if extra else rgb, "-sample", sample, *flags)
            if data is not None:
                out[f"{name}{extra}"] = data
    for name, flags in (
        ("arithmetic", ("-arithmetic",)),
        ("arithmetic progressive", ("-arithmetic", "-progressive")),
        ("restart rows", ("-restart", "1")),
        ("optimized", ("-optimize",)),
    ):
        data = _cjpeg(rgb, *flags)
        if data is not None:
            out[name] = data
    return out


# ---------------------------------------------------------------- structure-aware mutation


def segments(data: bytes) -> list[bytes]:
    """SOI, each marker segment (an SOS with its entropy-coded data), EOI and any trailing bytes, in order."""
    out, pos, n = [data[:2]], 2, len(data)
    while pos < n:
        if data[pos] != 0xFF or pos + 1 >= n:
            out.append(data[pos:])
            break
        marker = data[pos + 1]
        if marker == 0xD9 or 0xD0 <= marker <= 0xD7 or marker == 0x01 or marker == 0xFF:
            out.append(data[pos : pos + 2])
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # the scan's data runs to the next marker that is not RST or stuffing
            scan = end
            while scan + 1 < n and not (data[scan] == 0xFF and data[scan + 1] not in (0,) + tuple(range(0xD0, 0xD8))):
                scan += 1
            end = scan
        out.append(data[pos:end])
        pos = max(end, pos + 2)
    return out


def _set16(segment: bytearray, at: int, value: int) -> None:
    if at + 2 <= len(segment):
        segment[at : at + 2] = (value & 0xFFFF).to_bytes(2, "big")


def mutate(data: bytes, rng: np.random.Generator, donors: list[bytes]) -> tuple[bytes, list[str]]:
    """1 to 4 mutations that keep most of the structure: a frame's size, sampling factors or component count,
    a table's values, a segment duplicated (scans too), dropped, swapped or spliced from another seed, a length
    field, bits in entropy-coded data, restart markers inserted, the file cut."""
    parts = [bytearray(s) for s in segments(data)]
    done = []
    for _ in range(int(rng.integers(1, 5))):
        kind = str(
            rng.choice(
                [
                    "frame",
                    "sampling",
                    "components",
                    "table",
                    "duplicate",
                    "drop",
                    "swap",
                    "splice",
                    "length",
                    "entropy",
                    "restart",
                    "cut",
                    "bytes",
                ]
            )
        )
        i = int(rng.integers(1, len(parts))) if len(parts) > 1 else 0
        frames = [
            j
            for j, p in enumerate(parts)
            if len(p) > 9 and p[0] == 0xFF and p[1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB)
        ]
        scans = [j for j, p in enumerate(parts) if len(p) > 4 and p[:2] == b"\xff\xda"]
        if kind == "frame" and frames:
            f = parts[frames[0]]
            _set16(
                f,
                5 + 2 * int(rng.integers(0, 2)),
                int(rng.choice([0, 1, 7, 9, 65535, 8193, 4095, int(rng.integers(0, 65536))])),
            )
        elif kind == "sampling" and frames:
            f = parts[frames[0]]
            at = 11 + 3 * int(rng.integers(0, max(1, f[9])))
            if at < len(f):
                f[at] = int(
                    rng.choice(
                        [
                            0x11,
                            0x12,
                            0x21,
                            0x22,
                            0x41,
                            0x42,
                            0x44,
                            0x14,
                            0x31,
                            0x33,
                            0x00,
                            0xFF,
                            int(rng.integers(0, 256)),
                        ]
                    )
                )
        elif kind == "components" and frames:
            parts[frames[0]][9] = int(rng.choice([0, 1, 2, 3, 4, 5, 255]))
        elif kind == "table":
            tables = [j for j, p in enumerate(parts) if len(p) > 5 and p[1] in (0xC4, 0xDB, 0xDD, 0xCC)]
            if tables:
                t = parts[int(rng.choice(tables))]
                t[int(rng.integers(4, len(t)))] = int(rng.integers(0, 256))
        elif kind == "duplicate":
            j = int(rng.choice(scans)) if scans and rng.random() < 0.6 else i
            parts[j + 1 : j + 1] = [bytearray(parts[j]) for _ in range(int(rng.choice([1, 2, 10, 70])))]
        elif kind == "drop" and len(parts) > 2:
            del parts[i]
        elif kind == "swap" and len(parts) > 3:
            j = int(rng.integers(1, len(parts)))
            parts[i], parts[j] = parts[j], parts[i]
        elif kind == "splice":
            donor = segments(donors[int(rng.integers(len(donors)))])
            parts.insert(i, bytearray(donor[int(rng.integers(1, len(donor)))]) if len(donor) > 1 else bytearray())
        elif kind == "length" and len(parts[i]) >= 4:
            _set16(parts[i], 2, int(rng.choice([0, 1, 2, 65535, int(rng.integers(0, 65536))])))
        elif kind == "entropy" and scans:
            s = parts[int(rng.choice(scans))]
            for _ in range(int(rng.integers(1, 9))):
                s[int(rng.integers(4, len(s)))] ^= 1 << int(rng.integers(0, 8))
        elif kind == "restart" and scans:
            s = parts[int(rng.choice(scans))]
            at = int(rng.integers(4, len(s) + 1))
            s[at:at] = bytes([0xFF, 0xD0 + int(rng.integers(0, 8))])
        elif kind == "cut":
            blob = b"".join(parts)
            parts = [bytearray(blob[: int(rng.integers(2, len(blob) + 1))])]
        elif kind == "bytes":
            at = int(rng.integers(0, len(parts[i]) + 1))
            parts[i][at:at] = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        done.append(kind)
    return b"".join(parts), done


def make_input(seed: int, index: int, kinds: dict[str, bytes]) -> tuple[bytes, str]:
    """Input `index` of run `seed`: a pure function of the two (and the seeds)."""
    rng = np.random.default_rng([seed, index])
    names = sorted(kinds)
    name = names[int(rng.integers(len(names)))]
    if rng.random() < 0.05:
        return kinds[name], f"{name} unchanged"
    data, how = mutate(kinds[name], rng, [kinds[n] for n in names])
    return data, f"{name}: {', '.join(how)}"


# ---------------------------------------------------------------- the checks, in the child process


def hostile_boxes(rng: np.random.Generator) -> list[tuple[int, int, int, int, int]]:
    """(scale, left, top, right, bottom): in range, at the edges, empty, negative, huge, and bad scales."""
    big = 2**31 - 1
    out = [(int(rng.choice([1, 2, 4, 8])), 0, 0, 1, 1), (1, 0, 0, 48, 40), (8, 5, 4, 6, 5)]
    out += [
        (
            int(rng.choice([1, 2, 4, 8, 3, 0, -8, 16])),
            *(int(v) for v in rng.choice([0, 1, 7, 8, 16, 17, 36, 47, 48, 64, -1, big, -big - 1], 4)),
        )
        for _ in range(3)
    ]
    return out


def check_one(data: bytes, rng: np.random.Generator, tmp: Path) -> float:
    """Every decode path on one input; raises AssertionError (or anything unexpected) for a finding. Returns the
    CPU seconds of its slowest decode call (a file claiming 33 MP within the pixel cap takes 0.1 s a call)."""
    from cnnlab.data import transforms
    from cnnlab.data.images import open_image
    from cnnlab.errors import ImageError

    region, simple = transforms._jpeg_region, transforms._simplejpeg
    slowest = 0.0

    def timed(call, *args, **kwargs):
        nonlocal slowest
        start = time.process_time()
        try:
            return call(*args, **kwargs)
        finally:
            slowest = max(slowest, time.process_time() - start)

    if region is not None:
        for scale, *box in hostile_boxes(rng):
            try:
                pixels = timed(region.decode_region, data, scale, *box, bool(rng.integers(0, 2)))
            except ValueError:
                continue
            left, top, right, bottom = box
            assert len(pixels) in ((right - left) * (bottom - top), 3 * (right - left) * (bottom - top)), box
    for decoders in ((region, simple), (None, simple), (None, None)):
        transforms._jpeg_region, transforms._simplejpeg = decoders
        try:
            for key, mode in ((None, "RGB"), (1, "L"), (2, "RGB")):
                draw = None if key is None else transforms.sample_rng(0, 0, key)
                try:
                    out = timed(transforms.decode_crop, data, "fuzz.jpg", 16, mode, rng=draw)
                except ImageError as exc:
                    assert str(exc).startswith("fuzz.jpg: "), str(exc)
                    continue
                assert out.shape == (16, 16, 3 if mode == "RGB" else 1) and out.dtype == np.uint8
        finally:
            transforms._jpeg_region, transforms._simplejpeg = region, simple
    path = tmp / "fuzz.jpg"
    path.write_bytes(data)
    try:
        timed(lambda: open_image(path).convert("RGB"))
    except ImageError as exc:
        assert "fuzz.jpg" in str(exc)
    return slowest


def run_batch(seed: int, first: int, count: int) -> None:
    """Child process: inputs first..first+count-1; prints each index before it starts (so that the parent
    knows which one crashed) and one JSON line of results at the end."""
    kinds = seeds()
    slowest, findings = (0.0, -1, ""), []
    with tempfile.TemporaryDirectory() as tmp:
        check_one(kinds["baseline"], np.random.default_rng(0), Path(tmp))  # imports and first-use caches
        crash_at = int(os.environ.get("FUZZ_JPEG_CRASH_AT", -1))  # tests/test_fuzz.py: is a crash caught?
        for index in range(first, first + count):
            print(f"index {index}", flush=True)
            if index == crash_at:
                os.abort()
            data, how = make_input(seed, index, kinds)
            cpu = 0.0
            try:
                cpu = check_one(data, np.random.default_rng([seed, index, 1]), Path(tmp))
                problem = None
            except BaseException as exc:  # noqa: BLE001 - whatever escapes is the finding
                problem = f"{type(exc).__name__}: {str(exc)[:300]}"
            if cpu > slowest[0]:
                slowest = (cpu, index, how)
            if cpu > CPU_SECONDS:
                problem = (problem + "; " if problem else "") + f"a decode took {cpu:.2f} s of CPU"
            if problem:
                findings.append({"index": index, "how": how, "problem": problem})
    print(json.dumps({"slowest": slowest, "findings": findings}), flush=True)


# ---------------------------------------------------------------- the parent


def fuzz(seed: int, inputs: int, batch: int, out: Path | None, log=print) -> dict:
    """Run `inputs` inputs in child processes of `batch` inputs each; returns the figures and the findings."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")])),
    }
    kinds = seeds()
    findings, crashes, slowest, tried = [], 0, (0.0, -1, ""), 0
    first = 0
    while first < inputs:
        count = min(batch, inputs - first)
        done = subprocess.run(
            [sys.executable, __file__, "--child", f"{seed}:{first}:{count}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines and lines[-1].startswith("{"):
            result = json.loads(lines[-1])
            findings += result["findings"]
            if result["slowest"][0] > slowest[0]:
                slowest = tuple(result["slowest"])
            tried += count
            first += count
            continue
        # a crash (a signal, or an exit without results): the last index it started is the culprit
        started = [int(line.split()[1]) for line in lines if line.startswith("index ")]
        culprit = started[-1] if started else first
        crashes += 1
        _, how = make_input(seed, culprit, kinds)
        findings.append(
            {
                "index": culprit,
                "how": how,
                "problem": f"crashed the process (exit {done.returncode}): {done.stderr.strip()[-300:]}",
            }
        )
        tried += culprit - first + 1
        first = culprit + 1  # go on after it
    if out is not None and findings:
        out.mkdir(parents=True, exist_ok=True)
        for f in findings:
            data, _ = make_input(seed, f["index"], kinds)
            (out / f"seed{seed}-{f['index']}.jpg").write_bytes(data)
        (out / f"seed{seed}.json").write_text(json.dumps(findings, indent=1))
    report = {
        "seed": seed,
        "inputs tried": tried,
        "crashes": crashes,
        "findings": findings,
        "slowest decode call": {"cpu_s": round(slowest[0], 4), "index": slowest[1], "input": slowest[2]},
        "seed kinds": ", ".join(sorted(kinds)),
    }
    log(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh random seed")
    parser.add_argument("--batch", type=int, default=250, help="inputs per child process")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--replay", help="SEED:INDEX: run that one input here, and say what happens")
    args = parser.parse_args(argv)
    if args.child:
        run_batch(*(int(v) for v in args.child.split(":")))
        return 0
    if args.replay:
        seed, index = (int(v) for v in args.replay.split(":"))
        data, how = make_input(seed, index, seeds())
        print(how, len(data), "bytes")
        with tempfile.TemporaryDirectory() as tmp:
            print(f"slowest decode call: {check_one(data, np.random.default_rng([seed, index, 1]), Path(tmp)):.3f} s")
        return 0
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    report = fuzz(seed, args.inputs, args.batch, args.out)
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
