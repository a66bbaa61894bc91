"""Image files as preparation and scoring find and open them.

One notion of an image file everywhere: any suffix that Pillow has an opener for (.webp,
.jfif, .tif, ...), hidden files (``.*``, among them the ``._*`` resource forks macOS
leaves on copied disks) ignored, and every file opened the same way, EXIF orientation
applied, so that a frame and its mask can never end up rotated against each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from knowsam.errors import KnowsamError, describe_error

Image.init()  # registers every format plugin, so that the suffix list below is complete
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def image_files(folder: Path) -> dict[str, Path]:
    """{stem: path} of the folder's image files; other files and shared stems are refused, not skipped."""
    images: dict[str, Path] = {}
    others = []
    for path in sorted(folder.iterdir()):
        if is_hidden(path):
            continue
        if path.is_symlink() and not path.exists():  # would be skipped as "not a file": a frame silently lost
            raise KnowsamError(
                f"{path}: broken symbolic link (to {os.readlink(path)!r}, which does not exist); "
                "restore its target or remove the link"
            )
        if not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            others.append(path.name)
        elif path.stem in images:
            raise KnowsamError(
                f"{folder}: {images[path.stem].name} and {path.name} share the stem {path.stem!r}; keep one of them"
            )
        else:
            images[path.stem] = path
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise KnowsamError(
            f"{folder}: {len(others)} file(s) in no image format this version reads: {shown}; convert or remove them"
        )
    return images


def open_image(path: Path, what: str = "image") -> Image.Image:
    """The image, decoded and turned upright by its EXIF orientation; any failure is one line naming ``path``."""
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)  # a decoded copy, valid once the file is closed
            upright.format = image.format  # the copy forgets it; scoring needs to know a lossy file
            return upright
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise KnowsamError(f"{path}: unreadable {what} ({describe_error(exc)})") from None
