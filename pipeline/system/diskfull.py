"""A full disk is the user's to fix: say which file, how much room is left, what moves it.

``OSError: [Errno 28] No space left on device`` from deep inside a write names neither
the file (``write()`` errors carry no file name) nor the setting that would put it on
another disk. Stages wrap their big writes in :func:`disk_full_is_an_error`, outside
their own cleanup, so the free space the message reports is what a rerun will have.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(PipelineError):
    """No space left on the device (ENOSPC) or over quota (EDQUOT) while writing ``path``.

    Args:
        path: the file or folder being written.
        setting: the params.yaml key that puts ``path`` elsewhere, when known.
        detail: what was kept, e.g. a resumable partial download.
        missing: bytes still needed, when known.
    """

    def __init__(
        self,
        path: Path,
        *,
        setting: str | None = None,
        detail: str = "",
        missing: int | None = None,
    ) -> None:
        self.path, self.setting, self.detail, self.missing = Path(path), setting, detail, missing
        need = f"free at least {size_text(missing)} there" if missing else "free space there"
        move = f" or point {setting} in params.yaml to a disk with more room" if setting else ""
        super().__init__(
            f"disk full (ENOSPC): no space left on device writing {self.path} "
            f"({size_text(free_bytes(self.path))} free on that disk{detail}): {need}{move}"
        )


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


@contextlib.contextmanager
def disk_full_is_an_error(path: Path, setting: str, detail: str = "") -> Iterator[None]:
    """Raise a :class:`DiskFullError` naming ``setting`` for a full disk met inside.

    The file named is the one in the error when it has one, else ``path``; ``detail``
    says what was being written (e.g. " while unpacking the archive").
    """
    try:
        yield
    except DiskFullError as exc:
        if exc.setting:
            raise
        raise DiskFullError(
            exc.path, setting=setting, detail=exc.detail, missing=exc.missing
        ) from exc
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(Path(exc.filename or path), setting=setting, detail=detail) from exc


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def size_text(n: int) -> str:
    """``n`` bytes for people: "512 bytes", "48.0 kB", "3.2 MB", "1.5 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
