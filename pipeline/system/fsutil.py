"""File-system helpers shared by the stages: atomic writes, hashing, OS litter.

Every stage writes its outputs through these, so an interrupted stage never leaves a
half-written file or folder where DVC could cache it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

# Files whose suffix says "image": what a class folder or a labels table is expected to hold,
# and what the predictor picks out of a folder. Anything else is still probed by validate
# when it sits in a class folder (a misnamed image is an image).
IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".jfif",
    }
)

_LITTER_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", ".directory"}
_LITTER_DIRS = {"__MACOSX", ".Spotlight-V100", ".Trashes", ".fseventsd"}


def is_os_litter(relpath: str | PurePosixPath) -> bool:
    """True for files operating systems leave behind (``.DS_Store``, ``__MACOSX/``, ...)."""
    parts = PurePosixPath(str(relpath).replace("\\", "/")).parts
    if any(part in _LITTER_DIRS for part in parts):
        return True
    name = parts[-1] if parts else ""
    return name in _LITTER_NAMES or name.startswith("._")


def is_litter_name(name: str) -> bool:
    """True for one path component that :func:`is_os_litter` leaves out: the cheap test for
    a walk that sees one name at a time (100k files)."""
    return name in _LITTER_NAMES or name in _LITTER_DIRS or name.startswith("._")


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are not OS litter."""
    return [e for e in folder.iterdir() if not is_os_litter(e.name)]


def lone_folder_chain(top: Path) -> list[Path]:
    """``top`` and each lone folder under it (an archive's single top folder, and any below
    it), stopping at a symbolic link: a link is never followed out of the tree."""
    chain = [top]
    while (
        len(entries := visible_entries(chain[-1])) == 1
        and entries[0].is_dir()
        and not entries[0].is_symlink()
    ):
        chain.append(entries[0])
    return chain


def load_torch_weights(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never code.

    A file that needs anything more (a pickled object, a ``__reduce__`` payload) or is not
    a torch file at all is refused with its name instead of torch's unpickler traceback.
    torch is imported here, not at the top, so this module stays importable without it.
    """
    import pickle

    import torch

    from pipeline.errors import DataError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", str(exc))
        reason = found.group(1).strip() if found else type(exc).__name__
        raise DataError(
            f"{path}: refused to load: it is not a weights-only torch file ({reason}); "
            "this pipeline never unpickles objects. Delete it and rerun the stage that writes it."
        ) from None
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError) as exc:  # torn, garbled
        raise DataError(
            f"{path}: not a readable torch file ({type(exc).__name__}: {exc}); "
            "delete it and rerun the stage that writes it"
        ) from None


def save_torch_atomic(path: Path, obj: Any) -> None:
    """``torch.save`` to a temporary sibling, fsynced, renamed onto ``path``: a kill at any
    moment leaves the previous file or this one, never a torn one. (torch imported here.)"""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def file_hexdigest(path: Path, algorithm: str, chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file's bytes, read in chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return file_hexdigest(path, "sha256")


def md5_file(path: Path) -> str:
    """MD5, for what names files by it (DVC's cache, publishers that give only MD5)."""
    return file_hexdigest(path, "md5")


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries that killed writers of ``path`` left (``atomic_path`` names).

    Only for files one process at a time writes (a lock, such as DVC's, guarantees it).
    """
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
            remove(stale)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def touch(path: Path) -> None:
    """Mark ``path`` as used now (its mtime), for the memo's eviction (``system/memo.py``)."""
    with contextlib.suppress(OSError):
        os.utime(path)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``.

    Works for a file or a folder: the caller writes to the yielded path. On any error
    the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _tmp_sibling(path)
    remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if path.is_dir() and not path.is_symlink():
            # A folder cannot be replaced in one rename: move the old one aside first.
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        remove(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def link_or_copy(src: Path, dest: Path) -> None:
    """``dest`` as a hard link to ``src`` (the cache), or a copy across file systems."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def read_json_or_empty(path: Path) -> dict:
    """The JSON object in ``path``, or ``{}`` when it is missing or unreadable.

    For reports that show whatever figures earlier stages have written so far.
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def fresh_tempdir(near: Path, prefix: str) -> Path:
    """A new empty folder on the same file system as ``near`` (so renames are atomic)."""
    near.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=near))
