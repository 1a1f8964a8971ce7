"""``s3://bucket/prefix/`` sources through fsspec (s3fs, installed with dvc-s3): listing
what a prefix holds and fetching objects into a download cache keyed by (key, ETag).

The endpoint, region and credentials come from where every AWS tool reads them: the
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``) or ``~/.aws/config`` and ``~/.aws/credentials``;
botocore (through aiobotocore) resolves them, so nothing is configured here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import ConfigError, DataError
from pipeline.sources.fetch import DownloadError
from pipeline.system.fsutil import atomic_path, is_os_litter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredObject:
    """One object: its key relative to the source (``cat/001.jpg``; the object's own name
    for a single object), size, ETag and VersionId (None on an unversioned bucket)."""

    url: str
    relative: str
    size: int
    etag: str
    version_id: str | None

    def record(self) -> dict[str, Any]:
        return {
            "key": self.relative,
            "size": self.size,
            "etag": self.etag,
            "version_id": self.version_id,
        }


def filesystem(timeout_s: float, retries: int) -> Any:
    """An s3fs file system with the standard AWS configuration and our timeouts."""
    import s3fs

    return s3fs.S3FileSystem(
        config_kwargs={
            "connect_timeout": timeout_s,
            "read_timeout": timeout_s,
            "retries": {"max_attempts": retries + 1, "mode": "standard"},
        },
        skip_instance_cache=True,
    )


def split_url(url: str, key: str = "data.source") -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` → (``bucket``, ``some/prefix/``)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"{key}: expected s3://bucket/prefix, got {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _stored(url: str, relative: str, info: dict) -> StoredObject:
    """An object as s3fs describes it; VersionId ``null`` is an unversioned bucket's."""
    version = info.get("VersionId")
    return StoredObject(
        url,
        relative,
        int(info["size"]),
        str(info.get("ETag") or info.get("etag") or "").strip('"'),
        None if version in (None, "null") else str(version),
    )


def describe(url: str, fs: Any, key: str = "data.source") -> list[StoredObject] | StoredObject:
    """The objects under the prefix ``url`` (a list, sorted by key; OS litter left out), or
    the one object ``url`` names. Fails naming ``url`` when there is nothing there."""
    bucket, path = split_url(url, key)
    where = f"{bucket}/{path}".rstrip("/")
    try:
        if path and not path.endswith("/"):
            try:
                info = fs.info(where)
            except FileNotFoundError:
                info = {"type": "directory"}
            if info.get("type") == "file":
                return _stored(url, PurePosixPath(path).name, info)
        listing = fs.find(where, detail=True)
    except FileNotFoundError:
        listing = {}
    except OSError as exc:  # the store unreachable or refusing: a network failure
        raise DownloadError(f"{key}: cannot list {url}: {exc}") from exc
    prefix = where + "/"
    objects = []
    for name, info in sorted(listing.items()):
        if info.get("type") != "file" or not name.startswith(prefix):
            continue
        relative = name[len(prefix) :]
        if is_os_litter(relative) or relative.endswith("/"):
            continue
        objects.append(_stored(f"s3://{name}", relative, info))
    if not objects:
        raise DataError(f"{key}: nothing at {url} (no object, and no objects under it)")
    return objects


def cache_path(cache: Path, obj: StoredObject) -> Path:
    """Where ``obj`` is kept: named by its URL and ETag (and version), so a changed object is
    fetched again and an unchanged one never is."""
    digest = hashlib.sha256(f"{obj.url}\0{obj.etag}\0{obj.version_id}".encode()).hexdigest()
    suffix = "".join(PurePosixPath(obj.relative).suffixes[-2:])[:16]
    return cache / "s3" / digest[:2] / f"{digest[2:32]}{suffix}"


def fetch(obj: StoredObject, fs: Any, cache: Path, *, retries: int, backoff_s: float = 1.0) -> Path:
    """``obj`` in the download cache, fetched once (to a temporary name, then renamed) and
    checked for its size; retried with doubling backoff."""
    target = cache_path(cache, obj)
    if target.is_file() and target.stat().st_size == obj.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = obj.url.removeprefix("s3://")
    failures = 0
    while True:
        try:
            with atomic_path(target) as tmp:
                fs.get_file(source, str(tmp), version_id=obj.version_id)
                got = tmp.stat().st_size
                if got != obj.size:
                    raise OSError(f"got {got} bytes, the listing says {obj.size}")
            return target
        except (OSError, TimeoutError) as exc:
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"giving up on {obj.url} after {failures} failed attempts; last error: {exc}"
                ) from exc
            delay = min(30.0, backoff_s * 2 ** (failures - 1))
            log.warning(
                "fetching %s failed (%s); retry %d/%d in %.1fs",
                obj.url,
                exc,
                failures,
                retries,
                delay,
            )
            time.sleep(delay)


def listing_digest(records: list[dict]) -> str:
    """One sha256 over the objects' keys, sizes, ETags and versions (what was taken)."""
    text = "\n".join(
        f"{r['key']}\t{r['size']}\t{r['etag']}\t{r['version_id'] or ''}" for r in records
    )
    return hashlib.sha256(text.encode()).hexdigest()
