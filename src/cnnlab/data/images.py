"""Opening image files that may be hostile: the header is checked before any pixel is decoded."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from ..errors import ImageError

__all__ = ["open_image", "MAX_IMAGE_PIXELS"]

# 64 megapixels: far beyond any training or test image, yet a 3-channel decode stays under 200 MB.
# A few-kilobyte PNG can claim 100,000 x 100,000 pixels; that is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


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
