"""Extract zip and tar archives without trusting them.

A downloaded archive is data from a stranger: a member may try to escape the target
folder (``../``, absolute paths, links), impersonate a device, or unpack to far more
than it claims. Each member is checked before anything is written for it, sizes are
counted as bytes are actually written, and on any error the target is left empty.

Links of any kind are refused outright and every file is written by this module into a
fresh folder, so no later member can follow a link out of it. Tar members also pass
tarfile's ``data`` filter as a second opinion; this module's own checks come first and do
not depend on it, because that filter has had bypasses (CVE-2025-4517 and siblings) and
is missing from older Python patch releases. A zip's central directory is checked as a
whole before extraction: entries whose data overlap (one compressed stream reused by many
members, the "better zip bomb") and declared sizes beyond the limits are refused at once.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import logging
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.errors import DataError
from pipeline.system.fsutil import is_os_litter, remove

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_DRIVE = re.compile(r"[A-Za-z]:")
# What a corrupt or truncated archive raises while being read.
_READ_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,  # a zip compression method zipfile cannot read
)
# How each compressed tar begins, and the reader for it.
_TAR_COMPRESSION = (
    (b"\x1f\x8b", gzip.open),
    (b"BZh", bz2.open),
    (b"\xfd7zXZ\x00", lzma.open),
)


class UnsafeArchiveError(DataError):
    """A member would escape the target folder or is not a plain file or folder."""


class ArchiveLimitError(DataError):
    """The archive unpacks to more bytes or files than download.* allows."""


@dataclass
class ExtractLimits:
    """How much one download may extract, counted over every archive it unpacks.

    Pass one instance to each :func:`extract_archive` call of a download, so an archive of
    archives cannot multiply ``download.max_extracted_bytes`` by the number it holds. Bytes
    written are never given back, even for a folder later removed: the limit bounds the
    work a hostile download can cause, not only what it leaves on disk.
    """

    max_bytes: int  # download.max_extracted_bytes
    max_files: int  # download.max_files
    bytes: int = 0  # written so far
    files: int = 0


@dataclass(frozen=True)
class _Member:
    name: str
    is_dir: bool
    refusal: str | None  # why the member's type cannot be extracted, if it cannot
    open: Callable[[], IO[bytes]]


def archive_kind(path: Path) -> str | None:
    """``"zip"`` or ``"tar"`` (plain or gz/bz2/xz-compressed) judged by content, else None.

    Tar is tried first: an uncompressed tar whose last member is a zip would otherwise
    pass zipfile's end-of-file signature check.
    """
    path = Path(path)
    if not path.is_file():
        return None
    if tarfile.is_tarfile(path):
        return "tar"
    if zipfile.is_zipfile(path):
        return "zip"
    return None


def extract_archive(
    archive: Path,
    target: Path,
    *,
    max_bytes: int | None = None,
    max_files: int | None = None,
    limits: ExtractLimits | None = None,
) -> int:
    """Extract ``archive`` into ``target`` in one streaming pass, refusing unsafe members.

    OS litter (``__MACOSX/``, ``.DS_Store``, ...) is skipped. Files get default
    permissions; stored modes and owners are ignored.

    Args:
        archive: a zip or tar (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) file.
        target: a folder that does not exist or is empty. On error it is removed if
            this call created it, else emptied.
        max_bytes: most bytes to write (download.max_extracted_bytes).
        max_files: most files to write (download.max_files).
        limits: instead of ``max_bytes``/``max_files``: limits shared with the other
            archives of one download (nested archives), updated as files are written.

    Returns:
        The number of files written.

    Raises:
        UnsafeArchiveError: a member is absolute, has ``..`` or NUL in its path, is a
            link, device, FIFO or encrypted, repeats an earlier member's path, is refused
            by tarfile's data filter, or (zip) its data overlaps another member's.
        ArchiveLimitError: a limit would be exceeded.
        DataError: not an archive, corrupt, or ``target`` is not empty.
    """
    archive, target = Path(archive), Path(target)
    if limits is None:
        if max_bytes is None or max_files is None:
            raise TypeError("extract_archive needs max_bytes and max_files, or limits")
        limits = ExtractLimits(max_bytes, max_files)
    kind = archive_kind(archive)
    if kind is None:
        raise DataError(f"{archive}: not a zip or tar archive (.tar, .tar.gz, .tar.bz2, .tar.xz)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"cannot extract {archive}: {target} must be an empty folder or absent")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _members(archive, kind, target, limits) as members:
            files, size, litter = _extract(archive, members, target, limits)
    except BaseException:
        if created:
            remove(target)
        else:
            for child in target.iterdir():
                remove(child)
        raise
    log.info(
        "extracted %d files (%d bytes) from %s into %s; skipped %d OS litter entries",
        files,
        size,
        archive,
        target,
        litter,
    )
    return files


@contextlib.contextmanager
def _members(
    archive: Path, kind: str, target: Path, limits: ExtractLimits
) -> Iterator[Iterator[_Member]]:
    """The archive's members in stored order, read lazily; read errors become DataError."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                _check_zip_directory(archive, zf.infolist(), limits)
                yield (_zip_member(zf, info) for info in zf.infolist())
        else:
            with _tar_bytes(archive) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
                yield (_tar_member(tf, info, target) for info in _each_once(tf))
    except _READ_ERRORS as exc:
        raise DataError(f"{archive}: corrupt or truncated archive ({exc})") from exc


@contextlib.contextmanager
def _tar_bytes(archive: Path) -> Iterator[_Uncompressed]:
    """The tar's uncompressed bytes, for tarfile's stream mode (``r|``: never seeks back).

    Decompressed here rather than by ``r|gz``: tarfile's stream decompression copies its
    whole decompressed buffer on every read, so a very compressible tar of many small
    members (up to ~1000x per 10 KB block) costs CPU quadratic in that ratio.
    """
    with open(archive, "rb") as fh:
        head = fh.read(6)
        fh.seek(0)
        opener = next((o for magic, o in _TAR_COMPRESSION if head.startswith(magic)), None)
        if opener is None:
            yield _Uncompressed(fh)
            return
        with opener(fh) as decompressed:
            yield _Uncompressed(decompressed)


class _Uncompressed:
    """A reader whose errors on corrupt data (OSError from gzip and bz2) are tar read errors,
    so that they are reported as a corrupt archive, apart from errors writing the output."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    def read(self, size: int = -1) -> bytes:
        try:
            return self._fh.read(size)
        except OSError as exc:
            raise tarfile.ReadError(f"invalid compressed data: {exc}") from exc


def _each_once(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members in order, each forgotten once used: TarFile keeps every member it has
    read in ``members``, about 1 KB each, gigabytes for a tar of millions of empty files."""
    while (info := tf.next()) is not None:
        yield info
        tf.members.clear()


def _check_zip_directory(
    archive: Path, infos: list[zipfile.ZipInfo], limits: ExtractLimits
) -> None:
    """Refuse, before writing anything, overlapping entries and declared sizes over the limit.

    Each entry's local header (30 bytes at least) and compressed data must end before the
    next entry begins; a zip whose entries share one compressed stream expands it once per
    entry. Declared sizes can lie low (the byte count in :func:`_extract` still applies),
    but a zip that admits to being too big is refused without unpacking any of it.
    """
    by_offset = sorted(infos, key=lambda i: i.header_offset)
    for before, entry in zip(by_offset, by_offset[1:], strict=False):
        if entry.header_offset < before.header_offset + 30 + before.compress_size:
            raise _unsafe(
                archive,
                entry.filename,
                f"its data overlaps member {before.filename!r} (entries sharing compressed "
                "data: a zip bomb)",
            )
    declared = limits.bytes
    for info in infos:
        declared += info.file_size
        if declared > limits.max_bytes:
            raise ArchiveLimitError(
                f"{archive}: declares more than {limits.max_bytes} bytes uncompressed (at "
                f"member {info.filename!r}); raise download.max_extracted_bytes in "
                "params.yaml if the archive is trusted"
            )


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    mode = info.external_attr >> 16  # unix st_mode, when the creator stored one
    refusal = None
    if info.flag_bits & 0x1:
        refusal = "encrypted member (not supported)"
    elif stat.S_ISLNK(mode):
        refusal = "symbolic link"
    elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        refusal = f"special file (mode {oct(mode)})"
    return _Member(info.filename, info.is_dir(), refusal, lambda: zf.open(info))


def _tar_member(tf: tarfile.TarFile, info: tarfile.TarInfo, target: Path) -> _Member:
    if info.issym():
        refusal = f"symbolic link to {info.linkname!r}"
    elif info.islnk():
        refusal = f"hard link to {info.linkname!r}"
    elif info.ischr() or info.isblk():
        refusal = "device file"
    elif info.isfifo():
        refusal = "FIFO"
    elif not (info.isreg() or info.isdir()):
        refusal = f"unsupported member type {info.type!r}"
    else:
        refusal = _data_filter_refusal(info, target)

    def open_member() -> IO[bytes]:
        fh = tf.extractfile(info)
        assert fh is not None  # isreg() members always have data
        return fh

    return _Member(info.name, info.isdir(), refusal, open_member)


def _data_filter_refusal(info: tarfile.TarInfo, target: Path) -> str | None:
    """Why tarfile's ``data`` filter refuses the member, if it does (a second opinion).

    Looked up at call time, and skipped on Python patch releases that predate the filter.
    """
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:
        return None
    try:
        data_filter(info, str(target))
    except tarfile.FilterError as exc:
        return f"refused by tarfile's data filter ({exc})"
    return None


def _extract(
    archive: Path, members: Iterator[_Member], target: Path, limits: ExtractLimits
) -> tuple[int, int, int]:
    """Write the members; returns (files written, bytes written, litter skipped)."""
    seen: dict[str, bool] = {}  # relative path -> is a folder
    files = size = litter = 0
    for member in members:
        parts = _relative_parts(archive, member.name)
        if member.refusal:
            raise _unsafe(archive, member.name, member.refusal)
        if not parts:
            if member.is_dir:
                continue  # "./"
            raise _unsafe(archive, member.name, "empty file name")
        rel = "/".join(parts)
        if is_os_litter(rel):
            litter += 1
            log.debug("skipping OS litter %s in %s", rel, archive)
            continue
        _claim(archive, member.name, parts, member.is_dir, seen)
        path = target.joinpath(*parts)
        if member.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            continue
        files += 1
        limits.files += 1
        if limits.files > limits.max_files:
            raise ArchiveLimitError(
                f"{archive}: more than {limits.max_files} files (at member {member.name!r}); "
                "raise download.max_files in params.yaml if the archive is trusted"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        with member.open() as src, open(path, "xb") as dst:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                limits.bytes += len(chunk)
                if limits.bytes > limits.max_bytes:
                    raise ArchiveLimitError(
                        f"{archive}: unpacks to more than {limits.max_bytes} bytes (at member "
                        f"{member.name!r}); raise download.max_extracted_bytes in "
                        "params.yaml if the archive is trusted"
                    )
                dst.write(chunk)
    return files, size, litter


def _relative_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The member's path as safe components; backslashes count as separators."""
    if "\0" in name:
        raise _unsafe(archive, name, "NUL character in the name")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise _unsafe(archive, name, "absolute path")
    parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    if ".." in parts:
        raise _unsafe(archive, name, "'..' in the path would escape the target folder")
    return parts


def _claim(
    archive: Path, name: str, parts: tuple[str, ...], is_dir: bool, seen: dict[str, bool]
) -> None:
    """Record the path, refusing one that repeats a file or runs through a file."""
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if seen.setdefault(parent, True) is False:
            raise _unsafe(archive, name, f"its folder {parent!r} is a file in the archive")
    rel = "/".join(parts)
    if rel in seen and not (is_dir and seen[rel]):
        raise _unsafe(archive, name, "duplicate member path")
    seen[rel] = is_dir


def _unsafe(archive: Path, name: str, reason: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(f"{archive}: refusing member {name!r}: {reason}")
