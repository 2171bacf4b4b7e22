"""Coverage-guided fuzzing of the JPEG path with atheris (libFuzzer for Python): cnnlab's marker walk
(data/images.py) and decode_crop's dispatch are instrumented; the C decoders run but are not instrumented.
Optional, not part of `make fuzz` (atheris is not a dependency of cnnlab):

    pip install atheris
    python -c "import sys; sys.path.insert(0, 'tests'); import fuzz_jpeg, pathlib; d = pathlib.Path('corpus');
               d.mkdir(exist_ok=True); [(d / f'{i}.jpg').write_bytes(v) for i, v in enumerate(fuzz_jpeg.seeds().values())]"
    python tools/fuzz_jpeg_atheris.py corpus -max_total_time=600 -rss_limit_mb=3000 -max_len=65536

A crash file it writes is a finding: pin it in tests/test_limits.py (WALK_REGRESSIONS) once fixed.
"""

import sys
import time

import atheris

with atheris.instrument_imports():
    from cnnlab.data import images, transforms
    from cnnlab.errors import ImageError


def one(data: bytes) -> None:
    """The walk returns or refuses with ImageError; decode_crop returns a crop or ImageError; 1 s of CPU at most."""
    start = time.process_time()
    try:
        images.jpeg_structure(data, "f.jpg")
    except ImageError as exc:
        assert str(exc).startswith("f.jpg: ")
    try:
        out = transforms.decode_crop(data, "f.jpg", 16, "RGB", rng=transforms.sample_rng(0, 0, len(data) % 7))
        assert out.shape == (16, 16, 3)
    except ImageError as exc:
        assert str(exc).startswith("f.jpg: ")
    spent = time.process_time() - start
    if spent > 1.0:
        raise RuntimeError(f"took {spent:.2f} s of CPU")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
