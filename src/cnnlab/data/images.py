"""Opening image files that may be hostile: the header is checked before any pixel is decoded."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from ..errors import ImageError

__all__ = ["open_image", "read_image_file", "MAX_IMAGE_PIXELS", "MAX_IMAGE_FILE_BYTES"]

# 64 megapixels: far beyond any training or test image, yet a 3-channel decode stays under 200 MB.
# A few-kilobyte PNG can claim 100,000 x 100,000 pixels; that is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192
# 256 MiB: a 64-megapixel image stored uncompressed (RGB, 8 bits) takes 192 MiB; no real training image is larger.
MAX_IMAGE_FILE_BYTES = 256 << 20


def read_image_file(path: str | Path) -> bytes:
    """The bytes of an image file, its size checked before anything is read; an ImageError names the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE_FILE_BYTES:
                raise ImageError(f"{path}: {size:,} bytes, more than an image file may hold "
                                 f"({MAX_IMAGE_FILE_BYTES:,}); shrink or re-encode it")
            return f.read(MAX_IMAGE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror})") from None


def open_image(path: str | Path) -> Image.Image:
    """Decode `path` fully and return the image; any failure is an ImageError naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ImageError(f"{path}: claims {width}x{height} pixels, more than cnnlab opens "
                                     f"({MAX_IMAGE_PIXELS:,}): shrink it first")
                im.load()
                return im.copy()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own, larger limit
        raise ImageError(f"{path}: too many pixels ({exc}); cnnlab opens at most {MAX_IMAGE_PIXELS:,}: "
                         "shrink it first") from None
    except MemoryError:
        raise ImageError(f"{path}: too large to decode") from None
    except Exception as exc:  # decoders raise many types on malformed data (OSError, SyntaxError, struct.error...)
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise ImageError(f"{path}: not a readable image ({type(exc).__name__}: {reason})") from None
