"""Stage ``fingerprint``: what ``data.source`` holds now → ``paths.source_fingerprint``.

DVC runs it every time (``always_changed``) and it costs a directory walk or a few
requests, never a read of the images (``pipeline.sources.fingerprint``). Its one output is
download's dependency, written only when it differs and then atomically, so an unchanged
source leaves the file byte-identical and DVC skips download and everything after it.
Where a remote source cannot be reached, a pinned one (``data.follow: false``) keeps the
last record, so an offline ``dvc repro`` still finds everything up to date.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import DataParams, DownloadParams, Params, Paths
from pipeline.sources.fetch import DownloadError
from pipeline.sources.fingerprint import fingerprint_text, source_fingerprint
from pipeline.system.fsutil import write_text_atomic

log = logging.getLogger(__name__)


def run(paths: Paths, data: DataParams, download: DownloadParams, root: Path = Path(".")) -> dict:
    """Fingerprint the source; rewrite ``paths.source_fingerprint`` only when it changed."""
    target = paths.source_fingerprint
    try:
        before = target.read_text(encoding="utf-8")
    except OSError:
        before = None
    try:
        record = source_fingerprint(data, download, root)
    except DownloadError as exc:
        # Offline with a pinned source: its pins say what the data is, so the last record
        # stands and a cached download still serves. A followed one cannot be vouched for.
        kept = _record_of(before, data)
        if data.follow or kept is None:
            raise
        log.warning("fingerprint: %s; the source is pinned, so the last record stands", exc)
        return kept
    text = fingerprint_text(record)
    if before == text:
        log.info("fingerprint: %s unchanged (%s)", data.source, record["digest"][:12])
    else:
        write_text_atomic(target, text)
        log.info("fingerprint: %s changed → %s", data.source, record["digest"][:12])
    return record


def _record_of(text: str | None, data: DataParams) -> dict | None:
    """The last record, when it describes this ``data.source`` and ``data.labels``: one of
    a source the params no longer name vouches for nothing."""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    source, labels = record.get("source") or {}, record.get("labels") or {}
    named = (source.get("url") or source.get("path"), labels.get("url") or labels.get("path"))
    return record if named == (data.source, data.labels) else None


def main(params: Params) -> dict:
    return run(params.paths, params.data, params.download)
