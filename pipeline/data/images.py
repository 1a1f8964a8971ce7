"""The one way every stage opens an image: decoded fully, EXIF orientation applied, RGB.

``load_rgb`` is what features, fine-tuning, evaluation and export use; ``probe_image`` is
what validate uses to decide, file by file, whether ``load_rgb`` will succeed (in two
steps it can keep apart: ``probe_facts`` decodes, ``judge`` applies the bounds). Both
read a file, or an image's bytes in the raw store (an ``ImageRef``, from
``pipeline.data.rawstore``).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import DataError


class ImageRef(NamedTuple):
    """Where one image's bytes are: ``size`` bytes at ``offset`` of the file ``shard``.
    ``name`` (its logical path) is what errors say."""

    shard: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        with open(self.shard, "rb") as fh:
            data = os.pread(fh.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise DataError(
                f"{self.name}: its shard {self.shard} ends before its bytes: rerun download"
            )
        return data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read())


@dataclass(frozen=True, eq=False)
class ImageRefs(Sequence):
    """Many :class:`ImageRef`, held as arrays: a million of them take half the memory of a
    list of ImageRef, and a loader's workers share the arrays instead of copying objects."""

    files: list[str]  # the shard files
    shard: np.ndarray  # each image's index into ``files``
    offset: np.ndarray
    size: np.ndarray
    name: np.ndarray

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        return ImageRef(
            self.files[self.shard[item]],
            int(self.offset[item]),
            int(self.size[item]),
            str(self.name[item]),
        )


# What an image is read from: a file, or its place in the raw store.
Source = str | Path | ImageRef


def _opened(source: Source):
    return source.open() if isinstance(source, ImageRef) else source


# Modes Pillow decodes that load_rgb turns into RGB faithfully.
KNOWN_MODES = frozenset(
    {
        "1",
        "L",
        "LA",
        "La",
        "P",
        "PA",
        "RGB",
        "RGBA",
        "RGBa",
        "RGBX",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I",
        "I;16",
        "I;16B",
        "I;16L",
        "I;16N",
        "F",
    }
)
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_EXIF_ORIENTATION = 0x0112


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded image to 8-bit RGB, the same way for every stage.

    Transparency is composited on white (what a viewer shows), high-bit-depth greyscale
    is scaled by its type's range rather than clipped at 255.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = (
            1.0
            if img.mode == "F"
            else (65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0)
        )
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Source, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open ``path`` as an RGB image with its EXIF orientation applied.

    ``draft``: a size the caller will shrink to; JPEGs then decode at a fraction of
    their resolution (no smaller than this), which makes thumbnails cheap.
    """
    with Image.open(_opened(path)) as img:
        if draft is not None:
            img.draft("RGB", draft)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


# Difference hashes of flat or perfectly graded images say nothing about their content.
DEGENERATE_DHASHES = frozenset({"0" * 16, "f" * 16})


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: equal for resized or re-encoded copies of one picture."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@dataclass(frozen=True)
class ImageInfo:
    """What validate records about one file; ``reason`` is set when it is not usable."""

    format: str | None
    mode: str | None
    width: int | None
    height: int | None
    exif_orientation: int | None
    decodable: bool
    reason: str | None
    phash: str | None


@dataclass(frozen=True)
class ImageFacts:
    """What opening and decoding one file found, before any bound from params.yaml is
    applied: validate keeps these by sha256, so a changed ``validate.max_pixels`` judges
    kept facts again instead of decoding again (``judge``).

    ``decoded``: decoding the pixels was tried (False: refused from the header, or the
    header itself failed). ``error``: why opening (``decoded`` False) or decoding failed.
    """

    format: str | None
    mode: str | None
    width: int | None
    height: int | None
    exif_orientation: int | None
    decoded: bool
    error: str | None
    phash: str | None


def probe_facts(path: Source, max_pixels: int) -> ImageFacts:
    """Open ``path`` and decode it fully, as ``load_rgb`` would, unless its header alone
    already refuses it (more than ``max_pixels`` pixels: a decompression bomb costs
    nothing; a colour mode ``load_rgb`` does not convert)."""
    fmt = mode = width = height = orientation = None
    opened = False
    try:
        with warnings.catch_warnings():
            # Pillow's own guard (MAX_IMAGE_PIXELS) becomes an error, caught below.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_opened(path)) as img:
                fmt, mode = img.format, img.mode
                width, height = img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION)
                opened = True
                if width * height > max_pixels or mode not in KNOWN_MODES:
                    return ImageFacts(fmt, mode, width, height, orientation, False, None, None)
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "not usable"
        error = _describe_failure(path, exc)
        return ImageFacts(fmt, mode, width, height, orientation, opened, error, None)
    phash = f"{dhash(rgb):016x}"
    return ImageFacts(fmt, mode, width, height, orientation, True, None, phash)


def judge(facts: ImageFacts, max_pixels: int) -> ImageInfo | None:
    """The verdict on a file from its ``facts`` under ``max_pixels``; None when the facts
    cannot say (the file was refused from its header under a lower bound, and must now be
    decoded)."""

    def refused(reason: str) -> ImageInfo:
        f = facts
        return ImageInfo(
            f.format, f.mode, f.width, f.height, f.exif_orientation, False, reason, None
        )

    if facts.error is not None and not facts.decoded:
        return refused(facts.error)
    if facts.width * facts.height > max_pixels:
        return refused(
            f"decompression bomb: {facts.width}x{facts.height} pixels exceeds "
            f"validate.max_pixels={max_pixels}"
        )
    if facts.mode not in KNOWN_MODES:
        return refused(f"unsupported colour mode {facts.mode}")
    if not facts.decoded:
        return None
    if facts.error is not None:
        return refused(facts.error)
    f = facts
    return ImageInfo(f.format, f.mode, f.width, f.height, f.exif_orientation, True, None, f.phash)


def probe_image(path: Source, max_pixels: int) -> ImageInfo:
    """Decode ``path`` fully, as ``load_rgb`` would, and say whether it is usable.

    Images larger than ``max_pixels`` are rejected from their header alone, before any
    pixel is decoded, so a decompression bomb costs nothing.
    """
    info = judge(probe_facts(path, max_pixels), max_pixels)
    assert info is not None  # facts gathered under this bound always decide
    return info


def _describe_failure(path: Source, exc: Exception) -> str:
    size = path.size if isinstance(path, ImageRef) else Path(path).stat().st_size
    if size == 0:
        return "empty file"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression bomb: {exc}"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image"
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower():
        return f"truncated image: {message}"
    return f"cannot decode: {message}"
