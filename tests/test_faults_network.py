"""Network faults (RELIABILITY.md, issue #7 item 2) against a real HTTP server on 127.0.0.1.

The server (tests/httpserver.py) drops connections at random offsets, stalls, sends a
wrong Content-Length, fails with 500/503, ignores Range, answers 206 from the wrong
offset, replaces the file between attempts, and redirects where it must not be followed.
Every download either ends with the exact bytes (sha256 verified), resumed with Range +
If-Range where it could, or fails with an error naming the URL and the cause; a failed
download stage extracts nothing and leaves the previous ``data/raw`` as it was.

Random offsets come from ``random.Random(SEED)``; set ``PIPELINE_FAULTS_SEED`` to replay
other ones. Each test prints its offsets (``pytest -s``) and records them in its tally.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.sources import fetch
from pipeline.sources.fetch import ChecksumError, DownloadError, fetch_url
from pipeline.stages import download
from tests.support.faults import FULL, SEED, record, run_trials, trials
from tests.support.httpserver import CHANGED, LAST_MODIFIED, Faults, ServedFiles, etag_of
from tests.support.images import create_image_folder
from tests.support.project import REPO_ROOT, params_from, raw_keys, write_params

pytestmark = pytest.mark.faults

SIZE = (4 if FULL else 1) << 20  # the payload: several MB under `make faults`
# Backoff in milliseconds so retries cost nothing; the cap is what the tests check.
FAST = {"backoff_s": 0.001, "max_backoff_s": 0.004, "timeout_s": 5.0, "progress": False}


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


PAYLOAD = random_bytes(SIZE, SEED)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def error_from(call: Callable[[], object], kind: type[Exception]) -> str | None:
    """The message of the ``kind`` error ``call`` raises, or None; the caller checks for
    lost data before asserting there was an error."""
    try:
        call()
    except kind as exc:
        return str(exc)
    return None


def kept_wrong_bytes(dest: Path, expected: bytes) -> bool:
    return dest.exists() and dest.read_bytes() != expected


# -- fetch_url: resume, retry, verify -------------------------------------------------------


def test_connection_dropped_at_random_offsets_resumes_with_range_and_if_range(tmp_path):
    rng = random.Random(SEED)
    cases = [sorted(rng.sample(range(1, SIZE), rng.randint(1, 3))) for _ in range(trials(20))]

    def trial(offsets: list[int]) -> str | None:
        dest = tmp_path / f"drop-{offsets[0]}" / "data.bin"
        with ServedFiles({"/data.bin": PAYLOAD}, Faults(drop_at=list(offsets))) as server:
            fetch_url(server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
        if kept_wrong_bytes(dest, PAYLOAD):
            return "data lost"
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == DIGEST
        # Resumed where each connection broke, never restarted: one 200, then 206s.
        assert server.answers == [200] + [206] * len(offsets), server.answers
        assert "Range" not in server.seen[0].headers
        for seen, offset in zip(server.seen[1:], offsets, strict=True):
            assert seen.headers["Range"] == f"bytes={offset}-"
            assert seen.headers["If-Range"] == etag_of(PAYLOAD)
        assert leftovers(dest.parent) == ["data.bin"]
        return None

    failures = run_trials("download: connection dropped at random offsets", cases, trial)
    assert not failures, failures


def test_stall_longer_than_the_read_timeout_resumes(tmp_path, caplog):
    # Reads are 64 KiB; the server goes silent at least two reads in, so some bytes are kept.
    rng = random.Random(SEED + 1)
    cases = [rng.randrange(2 * fetch._CHUNK, SIZE) for _ in range(trials(5))]

    def trial(offset: int) -> str | None:
        dest = tmp_path / f"stall-{offset}" / "data.bin"
        caplog.clear()
        faults = Faults(drop_at=[offset], stall_s=3.0)  # 10x the client's read timeout
        with (
            ServedFiles({"/data.bin": PAYLOAD}, faults) as server,
            caplog.at_level(logging.WARNING, logger="pipeline.sources.fetch"),
        ):
            fetch_url(server.url("/data.bin"), dest, sha256=DIGEST, **{**FAST, "timeout_s": 0.3})
        if kept_wrong_bytes(dest, PAYLOAD):
            return "data lost"
        assert dest.read_bytes() == PAYLOAD
        assert "timed out" in caplog.text  # the stall was noticed as one, not as a close
        start = int(server.seen[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
        assert 0 < start <= offset and server.answers == [200, 206]
        assert server.seen[1].headers["If-Range"] == etag_of(PAYLOAD)
        return None

    failures = run_trials("download: server stalls mid-body past the read timeout", cases, trial)
    assert not failures, failures


def test_wrong_content_length_is_never_accepted_as_complete(tmp_path):
    rng = random.Random(SEED + 2)
    n = trials(10)
    cases = [rng.randint(1, 50_000) * (1 if i % 2 == 0 else -1) for i in range(n)]

    def trial(delta: int) -> str | None:
        dest = tmp_path / f"length{delta:+d}" / "data.bin"
        with ServedFiles({"/data.bin": PAYLOAD}, Faults(length_delta=delta)) as server:
            url = server.url("/data.bin")
            if delta > 0:
                # Claims more than it sends: the short body is an incomplete read, and the
                # server's own 416 (bytes */size) confirms the size before the sha256 check.
                fetch_url(url, dest, sha256=DIGEST, **FAST)
                assert server.answers == [200, 416], server.answers
                assert server.seen[1].headers["Range"] == f"bytes={SIZE}-"
            else:
                # Claims fewer and sends more: the truncated file fails its sha256; nothing kept.
                message = error_from(
                    lambda: fetch_url(url, dest, **FAST, sha256=DIGEST), ChecksumError
                )
        if kept_wrong_bytes(dest, PAYLOAD):
            return "data lost"
        if delta < 0:
            assert message and url in message and f"({SIZE + delta} bytes)" in message, message
        assert leftovers(dest.parent) == (["data.bin"] if delta > 0 else [])
        assert delta < 0 or dest.read_bytes() == PAYLOAD
        return None

    failures = run_trials(
        "download: wrong Content-Length (more or fewer bytes than sent)", cases, trial
    )
    assert not failures, failures


def retry_delays(caplog) -> list[float]:
    """The delays fetch_url logged before each retry (the last argument of its warning)."""
    return [r.args[-1] for r in caplog.records if r.msg.startswith("download of %s failed")]


def test_500_then_503_then_200_succeeds_with_capped_backoff(tmp_path, caplog):
    backoff, cap = FAST["backoff_s"], FAST["max_backoff_s"]
    cases = [
        # (statuses before the 200, Retry-After sent, the delays expected)
        ([500, 503], None, [backoff, 2 * backoff]),
        ([500, 503, 500, 503, 500], None, [backoff, 2 * backoff, cap, cap, cap]),
        ([503], "3600", [cap]),  # an hour asked for: the cap wins
    ]

    def trial(case) -> str | None:
        statuses, retry_after, expected = case
        dest = tmp_path / f"fail-{len(statuses)}-{retry_after}" / "data.bin"
        caplog.clear()
        faults = Faults(fail_with=list(statuses), retry_after=retry_after)
        with (
            ServedFiles({"/data.bin": PAYLOAD}, faults) as server,
            caplog.at_level(logging.WARNING, logger="pipeline.sources.fetch"),
        ):
            fetch_url(server.url("/data.bin"), dest, sha256=DIGEST, retries=5, **FAST)
        if kept_wrong_bytes(dest, PAYLOAD):
            return "data lost"
        assert dest.read_bytes() == PAYLOAD
        assert server.answers == [*statuses, 200]
        delays = retry_delays(caplog)
        assert delays == pytest.approx(expected) and max(delays) <= cap
        return None

    failures = run_trials("download: HTTP 500, 503 then 200 (capped backoff)", cases, trial)
    assert not failures, failures

    with ServedFiles({"/data.bin": PAYLOAD}, Faults(fail_with=[503] * 10)) as server:
        url = server.url("/data.bin")
        with pytest.raises(DownloadError, match="after 3 failed attempts; last error: HTTP 503"):
            fetch_url(url, tmp_path / "gone" / "data.bin", sha256=DIGEST, retries=2, **FAST)
    assert len(server.seen) == 3 and leftovers(tmp_path / "gone") == []


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    rng = random.Random(SEED + 3)
    cases = [rng.randrange(1, SIZE) for _ in range(trials(5))]

    def trial(offset: int) -> str | None:
        dest = tmp_path / f"norange-{offset}" / "data.bin"
        faults = Faults(drop_at=[offset], ignore_range=True)
        with ServedFiles({"/data.bin": PAYLOAD}, faults) as server:
            fetch_url(server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
        if kept_wrong_bytes(dest, PAYLOAD):
            return "data lost"
        assert dest.read_bytes() == PAYLOAD  # not the first bytes twice
        assert server.seen[1].headers["Range"] == f"bytes={offset}-"
        assert server.answers == [200, 200]  # asked for a range, got (and took) the whole file
        return None

    failures = run_trials("download: server ignores Range (200 to a ranged request)", cases, trial)
    assert not failures, failures


def test_206_from_the_wrong_offset_is_never_spliced(tmp_path, caplog):
    rng = random.Random(SEED + 4)
    cases = [
        (rng.randrange(1, SIZE // 2), rng.randint(1, 4096), lie)
        for lie in (False, True)
        for _ in range(trials(5))
    ]

    def trial(case) -> str | None:
        offset, shift, lie = case
        dest = tmp_path / f"shift-{offset}-{shift}-{lie}" / "data.bin"
        caplog.clear()
        faults = Faults(drop_at=[offset], range_shift=shift, range_lie=lie)
        with (
            ServedFiles({"/data.bin": PAYLOAD}, faults) as server,
            caplog.at_level(logging.INFO, logger="pipeline.sources.fetch"),
        ):
            fetch_url(server.url("/data.bin"), dest, sha256=DIGEST, **FAST)
        if kept_wrong_bytes(dest, PAYLOAD):
            return "data lost"
        assert dest.read_bytes() == PAYLOAD
        ranges = [s.headers.get("Range") for s in server.seen]
        # The wrong 206 is dropped and the file fetched whole from zero.
        assert ranges == [None, f"bytes={offset}-", None], ranges
        assert server.answers == [200, 206, 200]
        if lie:  # Content-Range claimed the right offset: only the sha256 could tell
            assert "sha256 mismatch in a file resumed from several responses" in caplog.text
        else:
            assert (
                f"bytes {offset + shift}-" in caplog.text and "restarting from zero" in caplog.text
            )
        return None

    failures = run_trials(
        "download: 206 from the wrong offset (honest or lying Content-Range)", cases, trial
    )
    assert not failures, failures


def test_file_replaced_between_attempts_is_sent_whole_and_fails_its_sha256(tmp_path):
    rng = random.Random(SEED + 5)
    new = random_bytes(SIZE // 2, SEED + 6)
    new_digest = hashlib.sha256(new).hexdigest()
    variants = [
        {},  # If-Range carries the strong ETag
        {"etag": False},  # ... or Last-Modified where there is no ETag
        {"ignore_if_range": True},  # a server that splices anyway: the sha256 catches it
    ]
    cases = [
        (rng.randrange(1, SIZE // 2), variant) for variant in variants for _ in range(trials(5))
    ]

    def trial(case) -> str | None:
        offset, variant = case
        folder = tmp_path / f"changed-{offset}-{len(variant) and next(iter(variant))}"
        faults = Faults(drop_at=[offset], change={"/data.bin": new}, change_after=1, **variant)
        with ServedFiles({"/data.bin": PAYLOAD}, faults) as server:
            url = server.url("/data.bin")
            message = error_from(
                lambda: fetch_url(url, folder / "data.bin", sha256=DIGEST, **FAST), ChecksumError
            )
        if kept_wrong_bytes(folder / "data.bin", PAYLOAD):
            return "data lost"
        assert message, "no ChecksumError"
        # What failed the check is the whole new file, not old bytes with new ones after them.
        assert url in message and f"got {new_digest} ({len(new)} bytes)" in message
        assert server.seen[1].headers["Range"] == f"bytes={offset}-"
        validator = LAST_MODIFIED if variant.get("etag") is False else etag_of(PAYLOAD)
        assert server.seen[1].headers["If-Range"] == validator
        if variant.get("ignore_if_range"):
            assert server.answers == [200, 206, 200]  # spliced, caught, fetched whole
            assert "Range" not in server.seen[2].headers
        else:
            assert server.answers == [200, 200]
        assert leftovers(folder) == []
        return None

    failures = run_trials(
        "download: file replaced upstream between attempts (ETag/Last-Modified change)",
        cases,
        trial,
    )
    assert not failures, failures

    # Had the user updated data.sha256 to the new file, the same sequence gives exactly it.
    faults = Faults(drop_at=[cases[0][0]], change={"/data.bin": new}, change_after=1)
    with ServedFiles({"/data.bin": PAYLOAD}, faults) as server:
        fetch_url(server.url("/data.bin"), tmp_path / "new.bin", sha256=new_digest, **FAST)
    assert (tmp_path / "new.bin").read_bytes() == new and server.answers == [200, 200]
    assert server.last_modified == CHANGED


# -- redirects -----------------------------------------------------------------------------


def test_redirect_to_file_url_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(PAYLOAD)  # following the redirect would even pass the sha256 check
    out = tmp_path / "out" / "data.bin"

    def trial(target: str) -> str | None:
        faults = Faults(redirects={"/data.bin": target})
        with ServedFiles({}, faults) as server:
            url = server.url("/data.bin")
            message = error_from(lambda: fetch_url(url, out, sha256=DIGEST, **FAST), DownloadError)
        if out.exists():
            return "data lost"
        assert message, "no DownloadError"
        assert f"refusing redirect from {url} to {target}: only http and https" in message
        assert [s.path for s in server.seen] == ["/data.bin"] and leftovers(out.parent) == []
        return None

    cases = [secret.as_uri(), "file:///etc/passwd", "ftp://127.0.0.1/data.bin"]
    failures = run_trials("download: redirect away from http(s) (file://, ftp://)", cases, trial)
    assert not failures, failures


PUBLIC = "public.example"  # what the DNS table below says is a public address


@pytest.fixture
def public_host(monkeypatch):
    """``http://public.example/...`` reaches the test server through it as an HTTP proxy,
    and resolves (for fetch's redirect check) to a public address."""
    real = fetch._addresses
    monkeypatch.setattr(
        fetch,
        "_addresses",
        lambda host, port: ["93.184.216.34"] if host == PUBLIC else real(host, port),
    )
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)

    def via(server: ServedFiles) -> None:
        monkeypatch.setenv("HTTP_PROXY", server.base_url)
        monkeypatch.setenv("http_proxy", server.base_url)

    return via


def test_redirect_from_a_public_host_to_an_internal_one_is_refused(stage, public_host):
    def trial(target: str) -> str | None:
        faults = Faults(redirects={"/new.tgz": target.format(port=server_port)})
        server.faults = faults
        target = target.format(port=server_port)
        before = len(server.seen)
        message = error_from(lambda: stage.run(f"http://{PUBLIC}/new.tgz"), DownloadError)
        if not stage.unchanged():
            return "data lost"
        assert (
            message
            and (
                f"refusing redirect from http://{PUBLIC}/new.tgz to {target}: it points to a "
                "loopback, private, link-local or reserved address"
            )
            in message
        ), message
        # The only request was the proxied one to the public host; the target was never asked.
        assert [s.headers["Host"] for s in server.seen[before:]] == [PUBLIC]
        assert not finished_downloads()
        return None

    cases = [
        "http://127.0.0.1:{port}/internal.tgz",
        "http://localhost:{port}/internal.tgz",
        "http://[::1]:{port}/internal.tgz",
        "http://10.0.0.5/new.tgz",
        "http://192.168.1.10/new.tgz",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/new.tgz",
        "http://[::ffff:127.0.0.1]:{port}/internal.tgz",
    ]
    # The internal address serves the very file asked for: following would even verify.
    with ServedFiles({"/new.tgz": stage.payload, "/internal.tgz": stage.payload}) as server:
        server_port = server.base_url.rsplit(":", 1)[1]
        public_host(server)
        failures = run_trials(
            "download: redirect from a public host to loopback/private/link-local", cases, trial
        )

        # Without the redirect the same proxied public URL downloads fine (the proxy works),
        # and a URL the user wrote naming 127.0.0.1 directly is their choice: allowed.
        server.faults = Faults(redirects={"/latest.tgz": "/new.tgz"})
        stage.run(f"http://{PUBLIC}/new.tgz")
        stage.run(server.url("/latest.tgz"))
        direct = [s for s in server.seen if s.headers["Host"] != PUBLIC]
    assert not failures, failures
    assert [s.path for s in direct] == ["/latest.tgz", "/new.tgz"]
    assert {p.split("/")[0] for p in raw_keys()} == {"cat", "dog"}


# -- the download stage: a failed download extracts nothing -------------------------------


def tar_gz(folder: Path, dest: Path) -> bytes:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname="images")
    return dest.read_bytes()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → sha256); what must not change."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def state() -> dict[str, str]:
    """data/raw and the download metrics: what a failed download must leave as they were."""
    return snapshot(Path("data/raw")) | {
        "metrics/download.json": Path("metrics/download.json").read_text()
    }


@pytest.fixture
def stage(tmp_path, monkeypatch):
    """A workspace with a previous download's ``data/raw`` (class ``fish``), and an archive
    of other images to serve; ``stage.run(url, **download_params)`` runs the stage."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    previous = create_image_folder(tmp_path / "previous", {"fish": 5}, seed=3)
    download.main(params_from({"data": {"source": str(previous)}}))
    archive = tar_gz(
        create_image_folder(tmp_path / "new", {"cat": 5, "dog": 5}), tmp_path / "new.tgz"
    )

    class Stage:
        payload = archive
        sha256 = hashlib.sha256(archive).hexdigest()
        before = state()

        @staticmethod
        def params(url: str, **download_params) -> dict:
            return {
                "data": {"source": url, "sha256": Stage.sha256},
                "download": {"retries": 0, "timeout_s": 5, **download_params},
            }

        @staticmethod
        def run(url: str, **download_params) -> None:
            download.main(params_from(Stage.params(url, **download_params)))

        @staticmethod
        def unchanged() -> bool:
            """data/raw and the metrics are as before; no temporary folder is left; a
            partial download kept to resume holds the file's first bytes."""
            temporaries = [p.name for p in Path("data").iterdir() if p.name.startswith(".")]
            parts = Path("data/downloads").glob("*.part")
            return (
                state() == Stage.before
                and not temporaries
                and all(archive.startswith(p.read_bytes()) for p in parts)
            )

    return Stage


def finished_downloads() -> list[str]:
    """Files in data/downloads other than resumable partial downloads."""
    folder = Path("data/downloads")
    return [p.name for p in folder.iterdir() if ".part" not in p.name] if folder.exists() else []


STAGE_FAILURES = {
    # name: (faults for a payload of n bytes, path asked, download params, the error says)
    "connection dropped, no retries left": (
        lambda n: Faults(drop_at=[n // 2]),
        "/new.tgz",
        {},
        "giving up on {url} after 1 failed attempt; last error: connection lost at byte",
    ),
    "stall, no retries left": (
        lambda n: Faults(drop_at=[n // 2], stall_s=3.0),
        "/new.tgz",
        {"timeout_s": 0.3},
        "giving up on {url} after 1 failed attempt; last error: ",
    ),
    "HTTP 503 until the retries run out": (
        lambda n: Faults(fail_with=[503] * 5, retry_after="0"),
        "/new.tgz",
        {"retries": 2},
        "giving up on {url} after 3 failed attempts; last error: HTTP 503",
    ),
    "Content-Length shorter than the body": (
        lambda n: Faults(length_delta=-(n // 3)),
        "/new.tgz",
        {},
        "sha256 mismatch for {url}: expected ",
    ),
    "HTTP 404": (lambda n: Faults(), "/missing.tgz", {}, "HTTP 404 Not Found for {url}"),
    "redirect to file://": (
        lambda n: Faults(redirects={"/new.tgz": "file:///etc/passwd"}),
        "/new.tgz",
        {},
        "refusing redirect from {url} to file:///etc/passwd: only http and https",
    ),
}


def test_failed_download_stage_extracts_nothing(stage):
    def trial(case: str) -> str | None:
        make_faults, path, params, says = STAGE_FAILURES[case]
        download_folder = Path("data/downloads")
        if download_folder.exists():
            for leftover in download_folder.iterdir():  # each case starts from nothing
                leftover.unlink()
        with ServedFiles({"/new.tgz": stage.payload}, make_faults(len(stage.payload))) as server:
            url = server.url(path)
            message = error_from(lambda: stage.run(url, **params), PipelineError)
        if not stage.unchanged() or finished_downloads():
            return "data lost"
        assert message and says.format(url=url) in message, message
        return None

    failures = run_trials(
        "download stage: a failed download extracts nothing, data/raw kept",
        list(STAGE_FAILURES),
        trial,
    )
    assert not failures, failures


def test_file_replaced_upstream_between_runs_fails_the_stage_cleanly(stage):
    new = random_bytes(len(stage.payload), SEED + 7)
    faults = Faults(drop_at=[len(stage.payload) // 2], change={"/new.tgz": new}, change_after=1)
    with ServedFiles({"/new.tgz": stage.payload}, faults) as server:
        url = server.url("/new.tgz")
        with pytest.raises(DownloadError, match="connection lost"):
            stage.run(url)  # retries: 0, so the partial download is left to resume
        kept_part = [p.name for p in Path("data/downloads").glob("*.part")]
        with pytest.raises(ChecksumError) as info:
            stage.run(url)
    message = str(info.value)
    ok = (
        stage.unchanged()
        and not list(Path("data/downloads").iterdir())
        and f"got {hashlib.sha256(new).hexdigest()}" in message
    )
    record("download stage: file replaced upstream between two runs", 1, int(ok), 0 if ok else 1)
    assert len(kept_part) == 1
    assert server.seen[1].headers["If-Range"] == etag_of(stage.payload)
    assert server.answers == [200, 200]  # the second run was sent the new file whole
    assert url in message and f"got {hashlib.sha256(new).hexdigest()}" in message
    assert stage.unchanged() and not list(Path("data/downloads").iterdir())


def test_command_line_reports_a_refused_download_and_exits_non_zero(stage):
    write_params(Path("params.yaml"), **stage.params("URL"))
    faults = Faults(redirects={"/new.tgz": "file:///etc/passwd"})
    with ServedFiles({"/new.tgz": stage.payload}, faults) as server:
        url = server.url("/new.tgz")
        write_params(Path("params.yaml"), **stage.params(url))
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "download"],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=120,
        )
    expected = f"download failed: refusing redirect from {url} to file:///etc/passwd"
    ok = done.returncode == 1 and expected in done.stderr and stage.unchanged()
    record("download stage (CLI): refused redirect, exit 1, nothing extracted", 1, int(ok))
    assert done.returncode == 1, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert stage.unchanged()
