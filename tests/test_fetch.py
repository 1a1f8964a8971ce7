"""fetch_url against a real HTTP server on 127.0.0.1 that drops, fails and redirects."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.sources import fetch
from pipeline.sources.fetch import ChecksumError, DownloadError, fetch_url
from tests.support.httpserver import Faults, ServedFiles

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB, every offset distinguishable
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5.0, "progress": False}


@pytest.fixture
def http_server() -> Iterator[ServedFiles]:
    with ServedFiles({"/data.bin": PAYLOAD, "/other.bin": b"other"}) as srv:
        yield srv


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def test_download_verifies_and_skips_when_present(http_server: ServedFiles, tmp_path: Path) -> None:
    dest = tmp_path / "raw" / "data.bin"
    url = http_server.url("/data.bin")
    assert fetch_url(url, dest, sha256=DIGEST.upper(), **{**FAST, "progress": True}) == dest
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest) == ["data.bin"]

    fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
    assert len(http_server.seen) == 1  # the second call made no request


def test_resumes_after_dropped_connection(http_server: ServedFiles, tmp_path: Path) -> None:
    http_server.faults = Faults(drop_after=100_000)
    dest = tmp_path / "data.bin"
    fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
    assert dest.read_bytes() == PAYLOAD
    first, second = http_server.seen
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=100000-"
    assert second.headers["If-Range"].startswith('"')  # the strong ETag from the first answer
    assert leftovers(dest) == ["data.bin"]


def test_resumes_after_a_stall(http_server: ServedFiles, tmp_path: Path) -> None:
    # Reads are 64 KiB: the bytes of the chunk in flight when the http_server went silent are lost.
    http_server.faults = Faults(drop_after=150_000, stall_s=2.0)
    dest = tmp_path / "data.bin"
    fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **{**FAST, "timeout_s": 0.2})
    assert dest.read_bytes() == PAYLOAD
    assert (
        http_server.seen[1].headers["Range"] == f"bytes={150_000 // fetch._CHUNK * fetch._CHUNK}-"
    )


def test_unreachable_server_gives_up(tmp_path: Path) -> None:
    with ServedFiles({}) as gone:
        url = gone.url("/data.bin")
    with pytest.raises(DownloadError, match="after 2 failed attempts; last error: ConnectionError"):
        fetch_url(url, tmp_path / "data.bin", sha256=None, retries=1, **FAST)


def test_resumes_a_part_left_by_an_earlier_process(
    http_server: ServedFiles, tmp_path: Path
) -> None:
    http_server.faults = Faults(drop_after=50_000)
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="after 1 failed attempt; "):
        fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, retries=0, **FAST)
    assert (tmp_path / "data.bin.part").stat().st_size == 50_000
    sidecar = json.loads((tmp_path / "data.bin.part.json").read_text())
    assert sidecar["url"] == http_server.url("/data.bin") and sidecar["size"] == len(PAYLOAD)

    fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.seen[-1].headers["Range"] == "bytes=50000-"
    assert leftovers(dest) == ["data.bin"]


def test_complete_part_is_verified_without_downloading_again(
    http_server: ServedFiles, tmp_path: Path
) -> None:
    # A process that crashed between the last byte and the rename: the http_server answers 416.
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    sidecar = {
        "url": http_server.url("/data.bin"),
        "etag": None,
        "last_modified": "Wed, 01 Jan 2025 00:00:00 GMT",
        "size": len(PAYLOAD),
    }
    (tmp_path / "data.bin.part.json").write_text(json.dumps(sidecar))
    fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [s.headers["Range"] for s in http_server.seen] == [f"bytes={len(PAYLOAD)}-"]


def test_part_of_a_changed_file_is_replaced(http_server: ServedFiles, tmp_path: Path) -> None:
    # The ETag recorded with the part no longer matches: If-Range makes the http_server send it all.
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(b"stale bytes of an older version")
    sidecar = {
        "url": http_server.url("/data.bin"),
        "etag": '"old"',
        "last_modified": None,
        "size": None,
    }
    (tmp_path / "data.bin.part.json").write_text(json.dumps(sidecar))
    fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.seen[0].headers["If-Range"] == '"old"'


def test_checksum_mismatch_keeps_nothing(http_server: ServedFiles, tmp_path: Path) -> None:
    dest = tmp_path / "data.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        fetch_url(http_server.url("/data.bin"), dest, sha256=wrong, **FAST)
    message = str(info.value)
    assert wrong in message and DIGEST in message and http_server.url("/data.bin") in message
    assert leftovers(dest) == []


def test_404_fails_at_once(http_server: ServedFiles, tmp_path: Path) -> None:
    url = http_server.url("/missing.bin")
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch_url(url, tmp_path / "missing.bin", sha256=None, **FAST)
    assert url in str(info.value)
    assert len(http_server.seen) == 1


def test_503_is_retried(
    http_server: ServedFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    http_server.faults = Faults(fail_with=[503, 500], retry_after="0")
    dest = tmp_path / "data.bin"
    with caplog.at_level(logging.WARNING, logger="pipeline.sources.fetch"):
        fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(http_server.seen) == 3
    assert "HTTP 503" in caplog.text and "retry 2/5" in caplog.text


def test_gives_up_after_retries(http_server: ServedFiles, tmp_path: Path) -> None:
    http_server.faults = Faults(fail_with=[503] * 10)
    url = http_server.url("/data.bin")
    with pytest.raises(DownloadError, match="after 3 failed attempts; last error: HTTP 503"):
        fetch_url(url, tmp_path / "data.bin", sha256=DIGEST, retries=2, **FAST)
    assert len(http_server.seen) == 3


def test_server_ignoring_range_restarts_from_zero(http_server: ServedFiles, tmp_path: Path) -> None:
    http_server.faults = Faults(drop_after=100_000, ignore_range=True)
    dest = tmp_path / "data.bin"
    fetch_url(http_server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.seen[1].headers["Range"] == "bytes=100000-"  # asked, got the whole file


def test_follows_redirect_on_the_same_server(http_server: ServedFiles, tmp_path: Path) -> None:
    http_server.faults = Faults(redirects={"/latest": "/data.bin"})
    dest = tmp_path / "data.bin"
    fetch_url(http_server.url("/latest"), dest, sha256=DIGEST, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert [s.path for s in http_server.seen] == ["/latest", "/data.bin"]


def test_refuses_redirect_to_file_scheme(http_server: ServedFiles, tmp_path: Path) -> None:
    http_server.faults = Faults(redirects={"/evil": "file:///etc/passwd"})
    with pytest.raises(DownloadError, match="only http and https"):
        fetch_url(http_server.url("/evil"), tmp_path / "x", sha256=None, **FAST)
    assert leftovers(tmp_path / "x") == []


def test_refuses_endless_redirects(http_server: ServedFiles, tmp_path: Path) -> None:
    http_server.faults = Faults(redirects={"/loop": "/loop"})
    with pytest.raises(DownloadError, match="more than 10 redirects"):
        fetch_url(http_server.url("/loop"), tmp_path / "x", sha256=None, **FAST)


def test_refuses_redirect_from_public_to_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {
        "public.example": ["93.184.216.34"],
        "internal.example": ["10.0.0.5"],
        "localhost": ["::1", "127.0.0.1"],
    }
    monkeypatch.setattr(fetch, "_addresses", lambda host, port: table.get(host, [host]))
    for target in (
        "http://127.0.0.1:8000/x",
        "http://internal.example/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:127.0.0.1]/",
    ):
        with pytest.raises(DownloadError, match="loopback, private"):
            fetch._check_redirect("https://public.example/data.tgz", target)
    fetch._check_redirect("https://public.example/a", "https://public.example/b")
    fetch._check_redirect("http://localhost:9000/a", "http://127.0.0.1:9000/b")


def test_rejects_non_http_url(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="only http and https"):
        fetch_url("file:///etc/passwd", tmp_path / "x", sha256=None, **FAST)
