"""Download a file over HTTP(S) robustly: resume, retry, follow redirects safely, verify.

Datasets are large and links are flaky, so a download resumes where it stopped, both
after a dropped connection and after a crashed process: the bytes so far live in
``<dest>.part`` and what is needed to resume them safely (URL, ETag / Last-Modified,
size) in ``<dest>.part.json``. Only a complete, verified file is renamed onto ``dest``.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.system.diskfull import DiskFullError, is_disk_full, size_text
from pipeline.system.fsutil import read_json_or_empty, remove, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_MAX_REDIRECTS = 10
_REDIRECT_CODES = {301, 302, 303, 307, 308}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# Statuses of a server that does not answer HEAD: ask for the first byte instead.
_HEAD_REFUSED = {403, 405, 501}
T = TypeVar("T")


class DownloadError(PipelineError):
    """The file could not be downloaded; the message names the URL and the cause."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected sha256."""


class _Retryable(Exception):
    """A failure worth another attempt, with the server's requested delay if it gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def fetch_url(
    url: str,
    dest: Path,
    *,
    sha256: str | None,
    retries: int = 5,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest``, resuming and retrying, and verify its sha256.

    Args:
        url: http(s) URL. It may name a loopback or private host; a redirect from a
            public host to such an address is refused.
        dest: final path; written only once the file is complete (and verified).
        sha256: expected hex digest (any case), or None to skip verification. When
            ``dest`` already has this digest, nothing is downloaded.
        retries: further attempts after a failure (connection error, stall, 5xx, 429).
            An attempt that got the file further than ever before resets the count, so
            a slow but progressing download is not abandoned.
        backoff_s: first retry delay; doubles per failure, capped at ``max_backoff_s``.
        timeout_s: connect timeout and the longest silence while reading (a stall).
        progress: show a tqdm bar (only when stderr is a terminal).

    Returns:
        ``dest``.

    Raises:
        DownloadError: a client error (e.g. HTTP 404), an unsafe redirect, or still
            failing after ``retries`` retries.
        ChecksumError: the complete file has another sha256; nothing is kept. A file
            resumed from several responses is first downloaded whole once more.
        DiskFullError: no space left for ``dest``; a partial download is kept to resume.
    """
    dest = Path(dest)
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise DownloadError(f"cannot download {url!r}: only http and https URLs are supported")
    expected = sha256.lower() if sha256 else None
    if dest.is_file():
        if expected and sha256_file(dest) == expected:
            log.info("%s already present with the expected sha256, not downloading", dest)
            return dest
        log.warning(
            "%s exists but %s; downloading it again",
            dest,
            "its sha256 differs" if expected else "no sha256 is given to check it",
        )
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (
            requests.Session() as session,
            tqdm(
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=None if progress else True,
            ) as bar,
        ):
            attempt = functools.partial(
                _attempt,
                session,
                url,
                part,
                meta,
                verified=expected is not None,
                timeout_s=timeout_s,
                bar=bar,
            )
            download = functools.partial(
                _with_retries,
                attempt,
                url,
                functools.partial(_size, part),
                retries=retries,
                backoff_s=backoff_s,
                max_backoff_s=max_backoff_s,
            )
            resumed = download()
            actual = sha256_file(part) if expected else None
            if actual != expected and resumed:
                # Pieced together from several responses: a server that honoured a range of
                # a file it had since replaced, or sent the wrong bytes, would go unnoticed
                # by HTTP. One whole download tells that apart from a changed file.
                log.warning(
                    "%s: sha256 mismatch in a file resumed from several responses; "
                    "downloading it whole once more",
                    url,
                )
                _discard(part, meta)
                download()
                actual = sha256_file(part)
        if actual != expected:
            size = _size(part)
            for path in (part, meta, dest):
                remove(path)
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {expected}, got {actual} ({size} bytes); "
                "the file changed upstream, the server sent wrong bytes, or the expected "
                "sha256 is wrong"
            )
        with open(part, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(part, dest)
        remove(meta)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise _disk_full(url, part, meta) from exc
    log.info("downloaded %s to %s (%d bytes)", url, dest, dest.stat().st_size)
    return dest


def url_validators(
    url: str,
    *,
    retries: int = 5,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
    timeout_s: float = 60.0,
) -> dict[str, str | int | None]:
    """What the server says about ``url`` now, without its body: ETag, Last-Modified and
    size, from a HEAD (or, where HEAD is refused, a GET of the first byte), with the same
    redirect checks, retries and timeouts as :func:`fetch_url`.

    Returns:
        ``{"etag", "last_modified", "size"}``, each None when the server does not say.

    Raises:
        DownloadError: a client error (e.g. HTTP 404), an unsafe redirect, or still
            failing after ``retries`` retries.
    """
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise DownloadError(f"cannot check {url!r}: only http and https URLs are supported")
    with requests.Session() as session:
        attempt = functools.partial(_validators_once, session, url, timeout_s)
        return _with_retries(
            attempt,
            url,
            lambda: 0,
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
        )


def _validators_once(
    session: requests.Session, url: str, timeout_s: float
) -> dict[str, str | int | None]:
    """One HEAD (or ranged GET) of ``url``: its validators, or raise."""
    headers = {"Accept-Encoding": "identity"}
    for method, extra in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
        resp = _request(session, url, {**headers, **extra}, timeout_s, method)
        with resp:
            status = resp.status_code
            if status == 429 or (status >= 500 and status != 501):
                raise _Retryable(f"HTTP {status} {resp.reason}", _retry_after(resp))
            if method == "HEAD" and status in _HEAD_REFUSED:
                continue
            if status not in (200, 206):
                raise DownloadError(f"HTTP {status} {resp.reason} for {url}")
            length = resp.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            if status == 206:
                match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
                size = int(match[3]) if match and match[3] != "*" else None
            return {
                "etag": resp.headers.get("ETag"),
                "last_modified": resp.headers.get("Last-Modified"),
                "size": size,
            }
    raise DownloadError(f"{url}: the server refused both HEAD and a ranged GET")


def _with_retries(
    attempt: Callable[[], T],
    url: str,
    progress: Callable[[], int],
    *,
    retries: int,
    backoff_s: float,
    max_backoff_s: float,
) -> T:
    """Call ``attempt`` until it succeeds, sleeping with capped doubling backoff between
    retryable failures; returns what the successful attempt returned. A failure after
    ``progress()`` (bytes so far) grew resets the count."""
    failures, furthest = 0, progress()
    while True:
        try:
            return attempt()
        except _Retryable as exc:
            if progress() > furthest:
                furthest, failures = progress(), 0
            failures += 1
            if failures > retries:
                raise DownloadError(
                    f"giving up on {url} after {failures} failed "
                    f"{'attempt' if failures == 1 else 'attempts'}; last error: {exc}"
                ) from exc
            delay = min(max_backoff_s, backoff_s * 2 ** (failures - 1))
            if exc.retry_after is not None:
                delay = min(max_backoff_s, exc.retry_after)
            log.warning(
                "download of %s failed (%s); retry %d/%d in %.1fs",
                url,
                exc,
                failures,
                retries,
                delay,
            )
            time.sleep(delay)


def _disk_full(url: str, part: Path, meta: Path) -> DiskFullError:
    """The error for a full disk; a non-empty ``part`` is kept for the next run to resume."""
    kept, total = _size(part), read_json_or_empty(meta).get("size")
    if not kept:
        _discard(part, meta)
        return DiskFullError(part, detail=f" while downloading {url}", missing=total)
    of = f" of {size_text(total)}" if total else ""
    return DiskFullError(
        part,
        detail=f"; {size_text(kept)}{of} of {url} are kept in it and the next run resumes there",
        missing=total - kept if total else None,
    )


def _attempt(
    session: requests.Session,
    url: str,
    part: Path,
    meta: Path,
    *,
    verified: bool,
    timeout_s: float,
    bar: tqdm,
) -> bool:
    """One request: append to (or restart) ``part`` until it is complete, or raise.

    Returns True when the complete ``part`` keeps bytes from before this request.
    """
    offset = _resume_offset(url, part, meta, verified)
    # identity: the bytes on disk must be the bytes the server has, so ranges line up.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        validator = _validator(read_json_or_empty(meta))
        if validator:
            headers["If-Range"] = validator
        log.info("resuming %s at byte %d", url, offset)
    else:
        log.info("downloading %s", url)

    resp = _request(session, url, headers, timeout_s)
    with resp:
        status = resp.status_code
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status} {resp.reason}", _retry_after(resp))
        if status == 416 and offset:
            total = _parse_total(resp.headers.get("Content-Range", ""))
            if (total if total is not None else read_json_or_empty(meta).get("size")) == offset:
                log.info("%s: the partial file is already complete", url)
                return True
            _discard(part, meta)
            raise _Retryable(f"server refused range {offset}- (size {total}); restarting")
        if status not in (200, 206):
            raise DownloadError(f"HTTP {status} {resp.reason} for {url}")

        if status == 206:
            match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not match or int(match[1]) != offset:
                _discard(part, meta)
                raise _Retryable(
                    f"server sent range {resp.headers.get('Content-Range')!r} "
                    f"for a request from byte {offset}; restarting from zero"
                )
            total = None if match[3] == "*" else int(match[3])
        else:
            if offset:
                log.info("%s: server sent the whole file instead of a range; restarting", url)
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None

        write_json_atomic(
            meta,
            {
                "url": url,
                "etag": resp.headers.get("ETag"),
                "last_modified": resp.headers.get("Last-Modified"),
                "size": total,
            },
        )
        bar.reset(total=total)
        bar.update(offset)
        received = offset
        try:
            with open(part, "ab" if offset else "wb") as fh:
                for chunk in resp.raw.stream(_CHUNK, decode_content=False):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise _Retryable(f"connection lost at byte {received}: {exc}") from exc
        if total is not None and received < total:
            raise _Retryable(f"body ended at byte {received} of {total}")
        return offset > 0


def _resume_offset(url: str, part: Path, meta: Path, verified: bool) -> int:
    """How many bytes of ``part`` can be kept; discards it when resuming is unsafe."""
    size = _size(part)
    if not size:
        return 0
    info = read_json_or_empty(meta)
    if info.get("url") != url:
        reason = "no record of its URL" if not info else f"it came from {info.get('url')}"
    elif info.get("size") is not None and size > info["size"]:
        reason = f"it is larger ({size}) than the file ({info['size']})"
    elif not _validator(info) and not verified:
        reason = "the server gave no ETag/Last-Modified and no sha256 is given to check it"
    else:
        return size
    log.info("discarding partial download %s: %s", part, reason)
    _discard(part, meta)
    return 0


def _validator(info: dict) -> str | None:
    """If-Range value: a strong ETag, else Last-Modified (weak ETags are not allowed)."""
    etag = info.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return info.get("last_modified")


def _request(
    session: requests.Session, url: str, headers: dict, timeout_s: float, method: str = "GET"
) -> requests.Response:
    """``_get``, with its failures sorted: a dropped or stalled connection is worth another
    attempt, any other request error is not."""
    try:
        return _get(session, url, headers, timeout_s, method=method)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
    except requests.RequestException as exc:
        raise DownloadError(f"cannot request {url}: {exc}") from exc


def _get(
    session: requests.Session,
    url: str,
    headers: dict[str, str],
    timeout_s: float,
    method: str = "GET",
) -> requests.Response:
    """GET (or ``method``), following redirects by hand so each hop can be checked."""
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        resp = session.request(
            method,
            current,
            headers=headers,
            stream=True,
            allow_redirects=False,
            timeout=(timeout_s, timeout_s),
        )
        if resp.status_code not in _REDIRECT_CODES:
            return resp
        location = resp.headers.get("Location")
        resp.close()
        if not location:
            raise DownloadError(f"HTTP {resp.status_code} from {current} without a Location")
        target = urljoin(current, location)
        _check_redirect(url, target)
        log.info("%s redirects to %s", current, target)
        current = target
    raise DownloadError(f"more than {_MAX_REDIRECTS} redirects starting from {url}")


def _check_redirect(origin: str, target: str) -> None:
    """Refuse redirects to other schemes, and from a public host to an internal one."""
    scheme = urlsplit(target).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"refusing redirect from {origin} to {target}: only http and https are allowed"
        )
    # A URL the user wrote may name an internal host; a public server may not send us there.
    if _is_internal(origin):
        return
    if _is_internal(target):
        raise DownloadError(
            f"refusing redirect from {origin} to {target}: it points to a loopback, "
            "private, link-local or reserved address"
        )


def _is_internal(url: str) -> bool:
    """True if the URL's host is, or resolves to, a non-public address."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    return any(_internal_ip(ip) for ip in _addresses(parts.hostname, parts.port))


def _addresses(host: str, port: int | None) -> list[str]:
    """IP addresses ``host`` resolves to; none if it does not resolve (the GET will fail)."""
    try:
        infos = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


def _internal_ip(text: str) -> bool:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def _retry_after(resp: requests.Response) -> float | None:
    """Seconds the server asked us to wait (Retry-After as seconds or an HTTP date)."""
    value = resp.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_total(content_range: str) -> int | None:
    match = re.fullmatch(r"bytes \*/(\d+)", content_range.strip())
    return int(match[1]) if match else None


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _discard(part: Path, meta: Path) -> None:
    remove(part)
    remove(meta)
