"""Stage ``download``: any source of labelled images → the raw store ``data/raw``.

The labels are the class folders' names, or a table's (``data.labels``; see
``pipeline.sources.labels``): either way the same ``<class>/<file>`` paths are stored,
so no later stage can tell the two apart.

``data.source`` may be an http(s) URL, a ``file://`` URL, a local archive, a local
folder, or ``builtin:NAME``. Archives (zip, tar, tar.gz/tgz, tar.bz2, tar.xz) are
extracted safely, one nested archive deep (Caltech's ``caltech-101.zip`` holds
``101_ObjectCategories.tar.gz``). The files are packed into the raw store
(``pipeline.data.rawstore``: tar shards and an index of ``<class>/<file>`` paths), written
to a temporary folder and renamed onto ``data/raw`` only when complete; the last run's
shards are hard-linked from it, so a run after a small growth writes, and DVC hashes and
pushes, only a new shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from pipeline.config import DataParams, DownloadParams, Params, Paths
from pipeline.data import filehashes, rawstore
from pipeline.errors import ConfigError, DataError
from pipeline.sources import builtin, labels, locations, objectstore
from pipeline.sources.archives import ExtractLimits, archive_kind, extract_archive
from pipeline.sources.fetch import ChecksumError, fetch_url
from pipeline.sources.locations import resolve_local
from pipeline.system.diskfull import disk_full_is_an_error
from pipeline.system.fsutil import (
    IMAGE_SUFFIXES,
    atomic_path,
    fresh_tempdir,
    is_os_litter,
    link_or_copy,
    lone_folder_chain,
    md5_file,
    read_json_or_empty,
    remove,
    sha256_file,
    visible_entries,
    write_json_atomic,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFolder:
    """A normalised image folder: class name → its files (relative paths inside the class)."""

    root: Path
    classes: dict[str, list[tuple[PurePosixPath, Path]]]
    loose_files: int


def materialise(
    data: DataParams,
    download: DownloadParams,
    downloads_dir: Path,
    workdir: Path,
    seen: dict | None = None,
) -> tuple[Path, dict]:
    """Make the source available locally: a file (archive) or a folder of class folders;
    with what was taken from a remote source (its sha256, or its objects), for the metrics.

    ``seen``: the fingerprint's record of the source (``paths.source_fingerprint``), whose
    validators tell a pinned download kept from an earlier run from a changed upstream."""
    source = data.source
    if source.startswith(builtin.PREFIX):
        if data.sha256 or data.md5:
            raise ConfigError("data.sha256 and data.md5 must be null for a builtin source")
        target = workdir / "builtin"
        builtin.render_builtin(source, target)
        return target, {}
    if locations.scheme(source) == "s3":
        return materialise_s3(data, download, downloads_dir, workdir)
    local = resolve_local(source)
    if local is None:
        path = fetch_remote(
            source, "data.sha256", data.sha256, data.md5, data, download, downloads_dir, seen
        )
        taken = (data.sha256 or sha256_file(path)).lower()  # a pin was just checked
        return path, {"sha256": taken, "bytes": path.stat().st_size}
    if not local.exists():
        raise DataError(f"data.source: {local} does not exist")
    if local.is_dir():
        if data.sha256 or data.md5:
            raise ConfigError(
                f"data.sha256/md5 apply to a file, but data.source {local} is a folder"
            )
        return local, {}
    if data.sha256:
        actual = sha256_file(local)
        if actual != data.sha256.lower():
            raise ChecksumError(
                f"{local}: sha256 mismatch: expected {data.sha256.lower()}, got {actual}"
            )
    verify_md5(local, data.md5, source, discard=False)
    return local, {}


def fetch_remote(
    url: str,
    pin_key: str,
    sha256: str | None,
    md5: str | None,
    data: DataParams,
    download: DownloadParams,
    downloads_dir: Path,
    seen: dict | None,
) -> Path:
    """An http(s) file in ``downloads_dir``: checked against its pin (``pin_key``), or, with
    ``data.follow``, taken as the URL holds it now.

    A pinned file kept from an earlier run is fetched again when the fingerprint saw other
    validators (ETag, Last-Modified, size) than when it was kept, so a changed upstream
    fails here, naming the URL and both digests, instead of passing on the old copy."""
    if not (sha256 or md5 or data.follow):
        raise ConfigError(
            f"{pin_key} is required for a remote source ({url}): set it to the file's "
            "published sha256 (or data.md5 where the publisher gives only an MD5) so a "
            "corrupted or replaced download is caught; or set data.follow: true to take "
            "whatever the URL holds now"
        )
    name = Path(unquote(urlparse(url).path)).name or "download"
    if data.follow:
        tag = "followed-" + hashlib.sha256(url.encode()).hexdigest()[:16]
    else:
        tag = (sha256 or md5 or "").lower()[:16]
    dest = downloads_dir / f"{tag}-{name}"
    kept_with = dest.with_name(dest.name + ".seen.json")
    validators, kept = _validators(seen, url), read_json_or_empty(kept_with)
    # the server still describes the kept file: same ETag or Last-Modified, same size
    current = (
        bool(validators)
        and kept == validators
        and bool(validators["etag"] or validators["last_modified"])
    )
    if dest.exists() and not current and (kept or data.follow):
        log.info("%s may have changed since %s was kept; fetching it again", url, dest.name)
        remove(dest)
    if data.follow and dest.exists():
        return dest  # followed, and unchanged upstream
    if not sha256 and md5 and dest.exists() and md5_file(dest) == md5.lower():
        return dest  # fetch_url reuses a finished download only when it can check a sha256
    with disk_full_is_an_error(downloads_dir, "paths.downloads"):
        path = fetch_url(
            url, dest, sha256=sha256, retries=download.retries, timeout_s=download.timeout_s
        )
    verify_md5(path, md5, url, discard=True)
    if validators:
        write_json_atomic(kept_with, validators)
    return path


def _validators(seen: dict | None, url: str) -> dict:
    """The ETag, Last-Modified and size the fingerprint saw at ``url``, if it looked there."""
    if not seen or seen.get("url") != url:
        return {}
    return {k: seen.get(k) for k in ("etag", "last_modified", "size")}


def materialise_s3(
    data: DataParams, download: DownloadParams, downloads_dir: Path, workdir: Path
) -> tuple[Path, dict]:
    """An ``s3://`` source: one archive object, fetched like a URL's file, or a prefix of
    ``<class>/<image>`` objects, linked from the download cache into a folder. Only
    objects not yet in the cache (by key and ETag) are fetched."""
    fs = objectstore.filesystem(download.timeout_s, download.retries)
    found = objectstore.describe(data.source, fs)
    if isinstance(found, objectstore.StoredObject):
        if not (data.sha256 or data.md5 or data.follow):
            raise ConfigError(
                f"data.sha256 is required for an s3 object ({data.source}), or set "
                "data.follow: true to take whatever the object holds now"
            )
        path = objectstore.fetch(found, fs, downloads_dir, retries=download.retries)
        if data.sha256 and (actual := sha256_file(path)) != data.sha256.lower():
            raise ChecksumError(
                f"sha256 mismatch for {data.source}: expected {data.sha256.lower()}, got "
                f"{actual}; the object changed upstream (set data.follow: true to take it)"
            )
        verify_md5(path, data.md5, data.source, discard=False)
        # the archive under its own name, so its kind is read from the suffix
        named = workdir / "s3-object" / found.relative
        link_or_copy(path, named)
        return named, {"sha256": sha256_file(path), **found.record()}
    if data.sha256 or data.md5:
        raise ConfigError(
            f"data.sha256/md5 apply to a file, but data.source {data.source} is a prefix"
        )
    folder = workdir / "s3-prefix"
    fetched = 0
    for obj in tqdm(found, desc="s3 objects", unit="obj", disable=None):
        fetched += not objectstore.cache_path(downloads_dir, obj).is_file()
        path = objectstore.fetch(obj, fs, downloads_dir, retries=download.retries)
        link_or_copy(path, folder / obj.relative)
    records = [obj.record() for obj in found]
    log.info("s3: %d objects under %s, %d fetched", len(found), data.source, fetched)
    return folder, {
        "objects": len(records),
        "fetched": fetched,
        "bytes": sum(r["size"] for r in records),
        "listing_sha256": objectstore.listing_digest(records),
    }


def verify_md5(path: Path, expected: str | None, source: str, discard: bool) -> None:
    """Check ``data.md5`` when given; a bad download is deleted so the next run refetches."""
    if expected is None:
        return
    actual = md5_file(path)
    if actual != expected.lower():
        if discard:
            remove(path)
        raise ChecksumError(f"{source}: md5 mismatch: expected {expected.lower()}, got {actual}")


def unwrap(root: Path) -> Path:
    """Descend through an archive's top folders: a lone folder that holds only folders.

    A lone folder holding files is a class (a one-class dataset), so it stays.
    """
    while True:
        entries = visible_entries(root)
        if (
            len(entries) == 1
            and entries[0].is_dir()
            and all(e.is_dir() for e in visible_entries(entries[0]))
        ):
            root = entries[0]
        else:
            return root


def descend(root: Path) -> Path:
    """Descend through every lone folder, e.g. to ``caltech-101/`` holding nested archives."""
    return lone_folder_chain(root)[-1]


def has_image_folders(root: Path) -> bool:
    """True when some sub-folder of ``root`` holds a file with an image suffix."""
    for entry in root.iterdir():
        if entry.is_dir() and not is_os_litter(entry.name):
            for _dirpath, _dirs, files in os.walk(entry):
                if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
                    return True
    return False


def opened(
    source: Path, data: DataParams, download: DownloadParams, workdir: Path
) -> tuple[Path, ExtractLimits | None]:
    """The source as a folder: itself, or the archive extracted (and ``data.member`` in it).

    The limits come back when the folder is a whole extracted archive, the one case where
    nested archives may still hold the images.
    """
    if source.is_dir():
        return source, None
    if archive_kind(source) is None:
        raise DataError(
            f"{source}: not a folder nor a supported archive (.zip, .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz)"
        )
    # One budget for the whole download: nested archives draw on the outer one's limits.
    limits = ExtractLimits(download.max_extracted_bytes, download.max_files)
    outer = workdir / "extract"
    extract_archive(source, outer, limits=limits)
    if not data.member:
        return outer, limits
    chosen = _member(outer, data.member, source)
    if chosen.is_dir():
        return chosen, None
    extract_archive(chosen, workdir / "member", limits=limits)
    return workdir / "member", None


def unpack(source: Path, data: DataParams, download: DownloadParams, workdir: Path) -> Path:
    """Return the folder whose sub-folders are the classes, extracting archives as needed."""
    folder, limits = opened(source, data, download, workdir)
    root = unwrap(folder)
    if limits is None or has_image_folders(root):
        return root
    return _nested_image_folder(source, descend(folder), workdir, limits)


def _nested_image_folder(source: Path, folder: Path, workdir: Path, limits: ExtractLimits) -> Path:
    """Extract the archives in ``folder``; exactly one of them must hold class folders."""
    nested = sorted(p for p in folder.iterdir() if p.is_file() and archive_kind(p) is not None)
    if not nested:
        raise DataError(f"{source}: no class folders with images and no nested archive inside")
    found = []
    for i, archive in enumerate(nested):
        inner = workdir / f"nested-{i}"
        extract_archive(archive, inner, limits=limits)
        if has_image_folders(unwrap(inner)):
            found.append((archive, unwrap(inner)))
        else:
            remove(inner)
    if len(found) != 1:
        names = ", ".join(a.name for a in ([a for a, _ in found] or nested))
        what = "several nested archives hold images" if found else "no nested archive holds images"
        raise DataError(f"{source}: {what} ({names}); set data.member to the one to use")
    log.info("using nested archive %s", found[0][0].name)
    return found[0][1]


def _member(outer: Path, member: str, source: Path) -> Path:
    """``data.member`` names a folder or nested archive, inside the archive or its top folder."""
    for base in (outer, descend(outer)):
        candidate = (base / member).resolve()
        if candidate.is_relative_to(outer.resolve()) and candidate.exists():
            return candidate
    raise DataError(f"{source}: data.member {member!r} is not in the archive")


def collect(root: Path, exclude: tuple[str, ...]) -> ImageFolder:
    """Map NFC class names to their files, skipping OS litter and excluded classes."""
    excluded = {unicodedata.normalize("NFC", name) for name in exclude}
    classes: dict[str, list[tuple[PurePosixPath, Path]]] = {}
    seen: dict[str, str] = {}
    loose = 0
    for entry in sorted(root.iterdir()):
        if is_os_litter(entry.name):
            continue
        if not entry.is_dir():
            loose += 1
            log.warning("ignoring %s: files must sit in a class folder", entry.name)
            continue
        name = unicodedata.normalize("NFC", entry.name)
        if name in seen:
            raise DataError(
                f"class folders {seen[name]!r} and {entry.name!r} have the same name after "
                "Unicode NFC normalisation; rename one of them"
            )
        seen[name] = entry.name
        if name in excluded:
            log.info("excluding class %r (data.exclude_classes)", name)
            continue
        files = _class_files(entry)
        if not files:
            log.warning("class folder %r holds no files; skipping it", entry.name)
            continue
        classes[name] = files
    if not classes:
        raise DataError(
            f"{root}: no class folders with files found (expected <class>/<image> layout)"
        )
    return ImageFolder(root, classes, loose)


def _class_files(folder: Path) -> list[tuple[PurePosixPath, Path]]:
    return [(PurePosixPath(rel), path) for rel, path in sorted(labels.files_under(folder).items())]


def stored_files(folder: ImageFolder) -> Iterator[tuple[str, str, Path]]:
    """(``<class>/<file>``, class, file) for every file of ``folder``, in order."""
    for name, files in folder.classes.items():
        for rel, path in files:
            yield f"{name}/{rel}", name, path


def locate_table(
    data: DataParams,
    download: DownloadParams,
    downloads_dir: Path,
    chain: list[Path],
    seen: dict | None = None,
) -> Path:
    """The ``data.labels`` table: fetched (an http(s) URL, which needs ``data.labels_sha256``),
    or found inside the source (its root or a lone folder below), else in the project (a
    relative name), or at its path."""
    table = data.labels
    assert table is not None
    local = resolve_local(table, "data.labels")
    if local is None:
        if table.startswith(builtin.PREFIX):
            raise ConfigError(
                f"data.labels: {table!r} is not a table; name a CSV, TSV or Parquet file"
            )
        if not (data.labels_sha256 or data.follow):
            raise ConfigError(
                f"data.labels_sha256 is required for a remote labels table ({table}): set it to "
                "the table's sha256 so a replaced table cannot relabel the data unnoticed; or "
                "set data.follow: true to take whatever the table holds now"
            )
        if locations.scheme(table) == "s3":
            fs = objectstore.filesystem(download.timeout_s, download.retries)
            found = objectstore.describe(table, fs, "data.labels")
            if not isinstance(found, objectstore.StoredObject):
                raise ConfigError(f"data.labels: {table} is a prefix; name the table's object")
            path = objectstore.fetch(found, fs, downloads_dir, retries=download.retries)
            if data.labels_sha256 and (actual := sha256_file(path)) != data.labels_sha256.lower():
                raise ChecksumError(
                    f"data.labels_sha256 mismatch for {table}: expected "
                    f"{data.labels_sha256.lower()}, got {actual}"
                )
            named = downloads_dir / "s3-tables" / found.relative
            remove(named)
            link_or_copy(path, named)
            return named
        return fetch_remote(
            table,
            "data.labels_sha256",
            data.labels_sha256,
            None,
            data,
            download,
            downloads_dir,
            seen,
        )
    places = [local] if local.is_absolute() else [level / local for level in chain] + [local]
    found = [p for p in places if p.is_file()]
    if not found:
        where = (
            "there is no such file"
            if local.is_absolute()
            else "it is neither inside the source (its root or a lone folder below it) nor "
            "in the project"
        )
        raise DataError(f"data.labels: {table!r} not found: {where}")
    if len(found) > 1:
        log.info("data.labels: using %s (also found: %s)", found[0], ", ".join(map(str, found[1:])))
    if data.labels_sha256 and (actual := sha256_file(found[0])) != data.labels_sha256.lower():
        raise ChecksumError(
            f"{found[0]}: data.labels_sha256 mismatch: expected {data.labels_sha256.lower()}, "
            f"got {actual}"
        )
    return found[0]


def table_name(table: str) -> str:
    """How reasons and errors name the ``data.labels`` table: its file name."""
    return PurePosixPath(unquote(urlparse(table).path)).name or table


def collect_labelled(
    folder: Path,
    data: DataParams,
    download: DownloadParams,
    downloads_dir: Path,
    seen: dict | None = None,
) -> tuple[ImageFolder, labels.LabelledFiles, Path]:
    """The classes a ``data.labels`` table gives the files under ``folder``, and the table
    used (``seen``: the fingerprint's record of the table)."""
    chain = lone_folder_chain(folder)
    table = locate_table(data, download, downloads_dir, chain, seen)
    name = table_name(str(data.labels))
    rows = labels.read_table(table, name, data.label_columns)
    root, files, links = labels.choose_root(chain, rows)
    own = None  # the table's own path among the files, when it ships inside the root
    if table.resolve().is_relative_to(root.resolve()):
        own = unicodedata.normalize("NFC", table.resolve().relative_to(root.resolve()).as_posix())
    labelled = labels.label_files(
        rows, files, name, data.exclude_classes, table_file=own, links=links
    )
    log.info("labels from %s: %d rows, root %s", table, len(rows), root)
    return ImageFolder(root, labelled.classes, loose_files=0), labelled, table


def last_store(raw: Path) -> rawstore.RawStore | None:
    """The last run's store, which DVC keeps (persist), for its shards to be kept; None
    where there is none or it cannot be read (then every image is written anew)."""
    try:
        return rawstore.RawStore.open_if_there(raw)
    except (DataError, OSError, ValueError) as exc:
        log.warning("not reusing the last raw store %s: %s", raw, exc)
        return None


def run(paths: Paths, data: DataParams, download: DownloadParams) -> dict:
    """Fetch, verify, extract and normalise ``data.source`` into ``paths.raw``; with a
    ``data.labels`` table, also record what became of each of its rows (``paths.label_rows``)."""
    # Outside the clean-up below, so a full disk is reported with the room a rerun has.
    with disk_full_is_an_error(
        paths.raw, "paths.raw", "; archives are first unpacked in a temporary folder beside it"
    ):
        workdir = fresh_tempdir(paths.raw.parent, "download")
        seen = read_json_or_empty(paths.source_fingerprint)
        try:
            source, taken = materialise(
                data, download, paths.downloads, workdir, seen.get("source")
            )
            labelled, taken_table = None, None
            if data.labels is None:
                folder = collect(unpack(source, data, download, workdir), data.exclude_classes)
            else:
                opened_folder, _limits = opened(source, data, download, workdir)
                folder, labelled, table = collect_labelled(
                    opened_folder, data, download, paths.downloads, seen.get("labels")
                )
                taken_table = sha256_file(table)
            # raw is renamed into place first; label_rows, which describes it, right after.
            previous = last_store(paths.raw)
            hashes = filehashes.load(paths.memo, data.source, transient=workdir)
            with atomic_path(paths.label_rows) as rows_tmp, atomic_path(paths.raw) as tmp:
                stored = rawstore.write_store(stored_files(folder), tmp, previous, hashes=hashes)
                labels.write_label_rows(rows_tmp, labelled.rows if labelled else [])
            filehashes.save(paths.memo, data.source, hashes)
        finally:
            remove(workdir)
    counts = {name: len(files) for name, files in folder.classes.items()}
    summary = {
        "source": data.source,
        "sha256": data.sha256,
        "follow": data.follow,
        # what was taken: a remote file's sha256, an s3 prefix's objects, the labels table's
        "taken": taken if taken_table is None else {**taken, "table_sha256": taken_table},
        "fingerprint": seen.get("digest"),  # paths.source_fingerprint's, when the stage ran
        "classes": len(counts),
        "files": sum(counts.values()),
        # files whose bytes a shard of the last run's store held: linked, not written
        "reused": stored.reused,
        "store": {
            "shards": stored.shards,
            "new_shards": stored.new_shards,
            "bytes": stored.bytes,
            "new_bytes": stored.new_bytes,
        },
        "excluded_classes": sorted(data.exclude_classes),
        "ignored_loose_files": folder.loose_files,
        "class_counts": counts,
    }
    if labelled is not None:
        issues = Counter(row.issue for row in labelled.rows if row.issue)
        summary["labels"] = {
            "table": data.labels,
            "rows": sum(1 for row in labelled.rows if row.row is not None),
            "duplicate_rows": labelled.duplicate_rows,
            "set_aside": sum(issues.values()),
            "set_aside_by_issue": dict(sorted(issues.items())),
            "ignored_files": labelled.ignored_files,
        }
    write_json_atomic(paths.metrics_file("download"), summary)
    log.info(
        "download: %d files in %d classes → %s", summary["files"], summary["classes"], paths.raw
    )
    return summary


def main(params: Params) -> dict:
    return run(params.paths, params.data, params.download)
