"""Extract zip and tar archives without trusting them.

A downloaded archive is data from a stranger: a member may try to escape the target
folder (``../``, absolute paths, links), impersonate a device, or unpack to far more
than it claims. Each member is checked before anything is written for it, sizes are
counted as bytes are actually written, and on any error the target is left empty.
"""

from __future__ import annotations

import contextlib
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
from pipeline.fsutil import is_os_litter, remove

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


class UnsafeArchiveError(DataError):
    """A member would escape the target folder or is not a plain file or folder."""


class ArchiveLimitError(DataError):
    """The archive unpacks to more bytes or files than download.* allows."""


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


def extract_archive(archive: Path, target: Path, *, max_bytes: int, max_files: int) -> int:
    """Extract ``archive`` into ``target`` in one streaming pass, refusing unsafe members.

    OS litter (``__MACOSX/``, ``.DS_Store``, ...) is skipped. Files get default
    permissions; stored modes and owners are ignored.

    Args:
        archive: a zip or tar (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) file.
        target: a folder that does not exist or is empty. On error it is removed if
            this call created it, else emptied.
        max_bytes: most bytes to write (download.max_extracted_bytes).
        max_files: most files to write (download.max_files).

    Returns:
        The number of files written.

    Raises:
        UnsafeArchiveError: a member is absolute, has ``..`` or NUL in its path, is a
            link, device, FIFO or encrypted, or repeats an earlier member's path.
        ArchiveLimitError: a limit would be exceeded.
        DataError: not an archive, corrupt, or ``target`` is not empty.
    """
    archive, target = Path(archive), Path(target)
    kind = archive_kind(archive)
    if kind is None:
        raise DataError(f"{archive}: not a zip or tar archive (.tar, .tar.gz, .tar.bz2, .tar.xz)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"cannot extract {archive}: {target} must be an empty folder or absent")
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    try:
        with _members(archive, kind) as members:
            files, size, litter = _extract(archive, members, target, max_bytes, max_files)
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
def _members(archive: Path, kind: str) -> Iterator[Iterator[_Member]]:
    """The archive's members in stored order, read lazily; read errors become DataError."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                yield (_zip_member(zf, info) for info in zf.infolist())
        else:
            with tarfile.open(archive, "r|*") as tf:  # stream mode: never seeks back
                yield (_tar_member(tf, info) for info in tf)
    except _READ_ERRORS as exc:
        raise DataError(f"{archive}: corrupt or truncated archive ({exc})") from exc


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


def _tar_member(tf: tarfile.TarFile, info: tarfile.TarInfo) -> _Member:
    refusal = None
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

    def open_member() -> IO[bytes]:
        fh = tf.extractfile(info)
        assert fh is not None  # isreg() members always have data
        return fh

    return _Member(info.name, info.isdir(), refusal, open_member)


def _extract(
    archive: Path, members: Iterator[_Member], target: Path, max_bytes: int, max_files: int
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
        if files > max_files:
            raise ArchiveLimitError(
                f"{archive}: more than {max_files} files (at member {member.name!r}); "
                "raise download.max_files in params.yaml if the archive is trusted"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        with member.open() as src, open(path, "xb") as dst:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise ArchiveLimitError(
                        f"{archive}: unpacks to more than {max_bytes} bytes (at member "
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
