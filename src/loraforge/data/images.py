"""Images referenced by dataset records and chat requests: local files or base64 ``data:`` URLs.

An :class:`ImageRef` is checked once when the data is read (the file exists and decodes; its size is
kept, which fixes its token count) and decoded again when a batch needs its pixels, so a dataset of
many images never holds them all decoded in memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.readers import DataError

DATA_URL_PREFIX = "data:image/"


@dataclass(frozen=True)
class ImageRef:
    """One image: a file path or the bytes of a data URL, its ``(width, height)``, and where it was named."""

    source: Path | bytes
    size: tuple[int, int]
    origin: str

    def open(self):
        """The image as an RGB ``PIL.Image``."""
        from PIL import Image

        data = io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source
        with Image.open(data) as image:
            return image.convert("RGB")


def image_ref(value: str, base_dir: Path, origin: str, allowed_root: Path | None = None) -> ImageRef:
    """Resolve and check an image reference: a ``data:image/...;base64,`` URL, or a path (relative ones
    against ``base_dir``; with ``allowed_root``, only a file inside that folder).

    Raises:
        DataError: not a string, a malformed data URL, a missing file, a path outside ``allowed_root``, or
            bytes that don't decode as an image; the message starts with ``origin``.
    """
    if not isinstance(value, str) or not value:
        raise DataError(f"{origin}: an image must be a file path or a data:image/...;base64 URL, got {value!r:.60}")
    if value.startswith("data:"):
        source: Path | bytes = _data_url_bytes(value, origin)
        shown = f"{value[:32]}..."
    else:
        source = _local_path(value, base_dir, origin, allowed_root)
        shown = value
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # a truncated file fails here, not in the middle of training
            size = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{origin}: image {shown!r} can't be read as an image ({err})") from None
    return ImageRef(source, size, origin)


def _data_url_bytes(url: str, origin: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not (url.startswith(DATA_URL_PREFIX) and comma and header.endswith(";base64")):
        raise DataError(f"{origin}: an image data URL must look like data:image/png;base64,<base64 bytes>; "
                        f"got {url[:40]!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{origin}: the image data URL's payload is not valid base64") from None


def _local_path(value: str, base_dir: Path, origin: str, allowed_root: Path | None) -> Path:
    if value.startswith(("http://", "https://")):
        raise DataError(f"{origin}: image {value!r}: remote URLs are not fetched; download the image and give its "
                        "path, or a data:image/...;base64 URL")
    path = Path(value.removeprefix("file://")).expanduser()
    path = Path(os.path.realpath(path if path.is_absolute() else base_dir / path))
    if allowed_root is not None and not path.is_relative_to(os.path.realpath(allowed_root)):
        raise DataError(f"{origin}: image {value!r} is outside the allowed image folder {allowed_root}")
    if not path.is_file():
        raise DataError(f"{origin}: image {value!r} not found (looked for {path})")
    return path
