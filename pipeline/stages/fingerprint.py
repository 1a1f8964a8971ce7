"""Stage ``fingerprint``: what ``data.source`` holds now → ``paths.source_fingerprint``.

DVC runs it every time (``always_changed``) and it costs a directory walk or a few
requests, never a read of the images (``pipeline.sources.fingerprint``). Its one output is
download's dependency, written only when it differs and then atomically, so an unchanged
source leaves the file byte-identical and DVC skips download and everything after it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import DataParams, DownloadParams, Params, Paths
from pipeline.sources.fingerprint import fingerprint_text, source_fingerprint
from pipeline.system.fsutil import write_text_atomic

log = logging.getLogger(__name__)


def run(paths: Paths, data: DataParams, download: DownloadParams, root: Path = Path(".")) -> dict:
    """Fingerprint the source; rewrite ``paths.source_fingerprint`` only when it changed."""
    record = source_fingerprint(data, download, root)
    text = fingerprint_text(record)
    target = paths.source_fingerprint
    try:
        before = target.read_text(encoding="utf-8")
    except OSError:
        before = None
    if before == text:
        log.info("fingerprint: %s unchanged (%s)", data.source, record["digest"][:12])
    else:
        write_text_atomic(target, text)
        log.info("fingerprint: %s changed → %s", data.source, record["digest"][:12])
    return record


def main(params: Params) -> dict:
    return run(params.paths, params.data, params.download)
