"""What a source holds now, cheaply: the fingerprint DVC sees as download's dependency.

DVC tracks ``data.source`` by its name in params.yaml; this module turns what the name
points at into a small JSON record whose bytes change exactly when the data may have:
a folder's listing (relative path, size, mtime_ns: no image is read), an archive's size
and mtime, a URL's validators (ETag, Last-Modified, size, from a HEAD), an S3 prefix's
listing (key, size, ETag, VersionId), a local labels table's sha256. The record has no
timestamps and sorted keys, so an unchanged source gives the same bytes and DVC skips
download (docs/new-data.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import DataParams, DownloadParams
from pipeline.sources import locations, objectstore
from pipeline.sources.fetch import url_validators
from pipeline.system.fsutil import is_litter_name, lone_folder_chain, sha256_file

FORMAT = 1  # bump when the record's meaning changes: every source then reads as changed


def source_fingerprint(data: DataParams, download: DownloadParams, root: Path) -> dict:
    """The fingerprint of ``data.source`` and ``data.labels`` as they are now.

    Args:
        data: the data section (source, pins, labels table).
        download: retries and timeout for the requests a remote source needs.
        root: the project folder that relative paths are relative to.

    Returns:
        ``{"format", "source", "labels", "digest"}``: ``source`` and ``labels`` say what
        was seen (counts, bytes, validators), ``digest`` is the sha256 of the rest.
    """
    record: dict[str, Any] = {
        "format": FORMAT,
        "source": _place(data.source, "data.source", data, download, root),
        "labels": None,
    }
    if data.labels is not None:
        record["labels"] = _table(data, download, root)
    record["digest"] = hashlib.sha256(_canonical(record).encode()).hexdigest()
    return record


def fingerprint_text(record: dict) -> str:
    """The record as written to ``paths.source_fingerprint``: the same bytes for the same
    record, always."""
    return json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _place(
    name: str, key: str, data: DataParams, download: DownloadParams, root: Path
) -> dict[str, Any]:
    kind = locations.scheme(name)
    if kind == "builtin":
        return {"kind": "builtin", "name": name}
    if kind in ("http", "https"):
        validators = url_validators(name, retries=download.retries, timeout_s=download.timeout_s)
        return {"kind": "url", "url": name, **validators}
    if kind == "s3":
        fs = objectstore.filesystem(download.timeout_s, download.retries)
        found = objectstore.describe(name, fs, key)
        if isinstance(found, objectstore.StoredObject):
            return {"kind": "s3-object", "url": name, **found.record()}
        records = [obj.record() for obj in found]
        return {
            "kind": "s3-prefix",
            "url": name,
            "objects": len(records),
            "bytes": sum(r["size"] for r in records),
            "listing_sha256": objectstore.listing_digest(records),
        }
    local = locations.resolve_local(name, key)
    assert local is not None
    path = local if local.is_absolute() else root / local
    if path.is_dir():
        return {"kind": "folder", "path": name, **folder_listing(path)}
    if path.is_file():
        stat = path.stat()
        return {
            "kind": "file",
            "path": name,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": data.sha256,
            "md5": data.md5,
        }
    return {"kind": "missing", "path": name}  # download says what is wrong


def folder_listing(folder: Path) -> dict[str, Any]:
    """Files, bytes and one sha256 over every file's relative path, size and mtime_ns under
    ``folder`` (links as their target; OS litter left out). Reads directories, never files."""
    digest = hashlib.sha256()
    files = total = 0
    pending = [(folder, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        subfolders = []
        for entry in entries:
            if is_litter_name(entry.name):
                continue
            rel = prefix + entry.name
            if entry.is_symlink():
                digest.update(f"L\t{rel}\t{os.readlink(entry.path)}\n".encode())
            elif entry.is_dir():
                subfolders.append((Path(entry.path), rel + "/"))
            else:
                stat = entry.stat()
                files += 1
                total += stat.st_size
                digest.update(f"F\t{rel}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        pending.extend(reversed(subfolders))  # depth first, in name order: one order always
    return {"files": files, "bytes": total, "listing_sha256": digest.hexdigest()}


def _table(data: DataParams, download: DownloadParams, root: Path) -> dict[str, Any]:
    """The labels table: validators for a URL or object, else the sha256 of each place
    download looks for it (inside a source folder's lone-folder chain, then the project)."""
    table = data.labels
    assert table is not None
    kind = locations.scheme(table)
    if kind in ("http", "https", "s3", "builtin"):
        return _place(table, "data.labels", data, download, root)
    local = locations.resolve_local(table, "data.labels")
    assert local is not None
    places: list[tuple[str, Path]] = []  # (how the record names it, where it is)
    if local.is_absolute():
        places = [(str(local), local)]
    else:
        source = (
            locations.resolve_local(data.source)
            if locations.scheme(data.source) == "local"
            else None
        )
        if source is not None:
            source = source if source.is_absolute() else root / source
            if source.is_dir():
                for level in lone_folder_chain(source):
                    inside = (level / local).relative_to(source).as_posix()
                    places.append((f"source:{inside}", level / local))
        places.append((f"project:{local.as_posix()}", root / local))
    return {
        "kind": "table",
        "path": table,
        "found": [
            {"place": name, "sha256": sha256_file(path)} for name, path in places if path.is_file()
        ],
    }
