"""Where a registry's objects live: a local folder, or an S3 bucket prefix.

The registry needs five things of a store, and both give them without a server of our own:
read an object whole or not at all, replace one in a single step (local: temp file and
rename; S3: one PUT), create one only if it does not exist (local: ``link``, which fails
on an existing name; S3: a conditional PUT, ``If-None-Match: *``), replace one only if it
is still the one read (S3: ``If-Match`` on its ETag, for a lock's lease), and list names.
S3 is driven with boto3 directly: its conditional writes are what the registry's
version numbers and lock rest on (s3fs exposes only ``If-None-Match`` on its exclusive
mode); endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``...), never from code.
Only the standard library is imported here; boto3 when an S3 store is opened.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import PipelineError


class RegistryError(PipelineError):
    """The registry cannot be reached or used; the message names its URL."""


class Store:
    """The operations the registry uses, on keys like ``classifier/versions/3/model.onnx``."""

    url: str

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        """Replace (or create) the object in one step: a reader sees the old or the new."""
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> bool:
        """Create the object only if there is none; False when one exists."""
        raise NotImplementedError

    def upload(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def download(self, key: str, path: Path) -> bool:
        """The object into ``path`` (a new file); False when there is none."""
        raise NotImplementedError

    def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix/`` (files and folders)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Reach the store once; RegistryError naming the URL when it cannot be used."""
        raise NotImplementedError

    def locked(
        self, key: str, timeout_s: float, lease_s: float
    ) -> contextlib.AbstractContextManager:
        """Hold the registry's lock ``key`` for the ``with`` body: one holder at a time."""
        raise NotImplementedError


def open_store(url: str) -> Store:
    """The store at ``url``: a folder (relative or absolute), ``file://``, or ``s3://``."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStore(Path(parsed.path if parsed.scheme else url))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise RegistryError(f"registry {url}: an S3 URL needs a bucket (s3://bucket/prefix)")
        return S3Store(url, parsed.netloc, parsed.path.strip("/"))
    raise RegistryError(
        f"registry {url}: unsupported scheme {parsed.scheme!r}; use a folder, file:// or s3://"
    )


class LocalStore(Store):
    """A folder; the lock is an ``fcntl`` lock on a file, released by the kernel when its
    holder dies (so no lease is needed)."""

    def __init__(self, root: Path) -> None:
        self.root, self.url = root, str(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _failed(self, exc: OSError, what: str) -> RegistryError:
        return RegistryError(f"registry {self.url}: cannot {what}: {exc.strerror or exc}")

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._failed(exc, f"read {key}") from None

    def _temp(self, key: str, data: bytes | None = None, source: Path | None = None) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            if source is not None:
                with open(source, "rb") as src:
                    while chunk := src.read(1 << 20):
                        f.write(chunk)
            else:
                f.write(data or b"")
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _sync_dir(self, folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes) -> None:
        try:
            tmp = self._temp(key, data)
            os.replace(tmp, self._path(key))
            self._sync_dir(self._path(key).parent)
        except OSError as exc:
            raise self._failed(exc, f"write {key}") from None

    def upload(self, key: str, path: Path) -> None:
        try:
            tmp = self._temp(key, source=path)
            os.replace(tmp, self._path(key))
            self._sync_dir(self._path(key).parent)
        except OSError as exc:
            raise self._failed(exc, f"write {key}") from None

    def create(self, key: str, data: bytes) -> bool:
        try:
            tmp = self._temp(key, data)
            try:
                os.link(tmp, self._path(key))  # fails when the name exists: exclusive
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
            self._sync_dir(self._path(key).parent)
            return True
        except OSError as exc:
            raise self._failed(exc, f"create {key}") from None

    def download(self, key: str, path: Path) -> bool:
        data = self.read(key)
        if data is None:
            return False
        path.write_bytes(data)
        return True

    def children(self, prefix: str) -> list[str]:
        try:
            return sorted(p.name for p in self._path(prefix).iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._failed(exc, f"list {prefix}") from None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as exc:
            raise self._failed(exc, "use the folder") from None

    @contextlib.contextmanager
    def locked(self, key: str, timeout_s: float, lease_s: float) -> Iterator[None]:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._failed(exc, f"open the lock {key}") from None
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RegistryError(
                            f"registry {self.url}: another promoter held {key} for "
                            f"{timeout_s:g} s (promote.lock_timeout_s)"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock


class S3Store(Store):
    """A bucket prefix, through boto3. The lock is an object created with ``If-None-Match:
    *`` holding its expiry; its holder renews it (``If-Match`` on its own ETag) every third
    of the lease, so a lock whose holder died frees itself once the lease runs out, and
    whoever takes over a stale one does so with ``If-Match`` too: one of them wins."""

    def __init__(self, url: str, bucket: str, prefix: str) -> None:
        import boto3
        from botocore.config import Config

        self.url, self.bucket, self.prefix = url, bucket, prefix
        # Few retries and short connects: a registry that is down fails the stage in
        # seconds, naming it, rather than after botocore's minutes of backoff.
        config = Config(
            connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}
        )
        # A session of its own: the environment is read now, not when boto3's default
        # session first was (a long-lived service may be given new credentials).
        self.client = boto3.session.Session().client("s3", config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise RegistryError(
                f"registry {self.url}: cannot {what}: {error.get('Code')} {error.get('Message', '')}".rstrip()
            ) from None
        except BotoCoreError as exc:
            raise RegistryError(f"registry {self.url} unreachable ({what}): {exc}") from None

    @staticmethod
    def _code(exc) -> str:
        return str(exc.response.get("Error", {}).get("Code", ""))

    def read(self, key: str) -> bytes | None:
        return self._read_tagged(key)[0]

    def _read_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        from botocore.exceptions import ClientError

        def get():
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if self._code(exc) in ("NoSuchKey", "404"):
                    return None, None
                raise
            return obj["Body"].read(), obj["ETag"]

        return self._call(f"read {key}", get)

    def write(self, key: str, data: bytes) -> None:
        self._call(
            f"write {key}",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
        )

    def _put_if(self, key: str, data: bytes, **condition) -> str | None:
        """PUT under a condition; the new ETag, or None when the condition failed."""
        from botocore.exceptions import ClientError

        def put():
            try:
                return self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, **condition
                )["ETag"]
            except ClientError as exc:
                # 412: the condition failed; 409: a concurrent conditional write won
                if self._code(exc) in (
                    "PreconditionFailed",
                    "412",
                    "ConditionalRequestConflict",
                    "409",
                ):
                    return None
                raise

        return self._call(f"write {key}", put)

    def create(self, key: str, data: bytes) -> bool:
        return self._put_if(key, data, IfNoneMatch="*") is not None

    def upload(self, key: str, path: Path) -> None:
        # One PUT (no multipart): an object appears whole or not at all. Models are far
        # below S3's 5 GB limit for one PUT.
        with open(path, "rb") as f:
            self._call(
                f"upload {key}",
                self.client.put_object,
                Bucket=self.bucket,
                Key=self._key(key),
                Body=f,
            )

    def download(self, key: str, path: Path) -> bool:
        from botocore.exceptions import ClientError

        def get():
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if self._code(exc) in ("NoSuchKey", "404"):
                    return False
                raise
            with open(path, "wb") as f:
                for chunk in obj["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
            return True

        return self._call(f"download {key}", get)

    def children(self, prefix: str) -> list[str]:
        base = self._key(prefix).rstrip("/") + "/"

        def listing():
            names = set()
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                names.update(
                    p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])
                )
                names.update(o["Key"][len(base) :] for o in page.get("Contents", []))
            return sorted(names)

        return self._call(f"list {prefix}", listing)

    def delete(self, key: str) -> None:
        self._call(
            f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=self._key(key)
        )

    def check(self) -> None:
        self._call("reach the bucket", self.client.head_bucket, Bucket=self.bucket)

    @contextlib.contextmanager
    def locked(self, key: str, timeout_s: float, lease_s: float) -> Iterator[None]:
        owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

        def body() -> bytes:
            return json.dumps({"owner": owner, "expires_at": time.time() + lease_s}).encode()

        deadline = time.monotonic() + timeout_s
        while True:
            etag = self._put_if(key, body(), IfNoneMatch="*")
            if etag is not None:
                break
            data, held_tag = self._read_tagged(key)
            if data is not None and held_tag is not None and _expired(data):
                etag = self._put_if(key, body(), IfMatch=held_tag)  # take over a stale lock
                if etag is not None:
                    break
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"registry {self.url}: another promoter held {key} for {timeout_s:g} s "
                    "(promote.lock_timeout_s)"
                )
            time.sleep(0.2)
        lease = _Lease(self, key, etag, body, lease_s)
        lease.start()
        try:
            yield
            lease.stop()
            if lease.lost:
                raise RegistryError(
                    f"registry {self.url}: the lock {key} was lost (its lease of {lease_s:g} s "
                    "ran out before it was renewed; promote.lock_lease_s)"
                )
        finally:
            lease.stop()
            if not lease.lost:
                current, tag = self._read_tagged(key)
                if tag == lease.etag:
                    self.delete(key)


def _expired(data: bytes) -> bool:
    try:
        return float(json.loads(data)["expires_at"]) < time.time()
    except (ValueError, KeyError, TypeError):
        return True  # a lock that says nothing readable holds nothing


class _Lease(threading.Thread):
    """Renews an S3 lock every third of its lease, while its holder works."""

    def __init__(self, store: S3Store, key: str, etag: str, body, lease_s: float) -> None:
        super().__init__(daemon=True, name="registry-lease")
        self.store, self.key, self.etag, self.body, self.lease_s = store, key, etag, body, lease_s
        self.lost, self._done = False, threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.lease_s / 3):
            try:
                etag = self.store._put_if(self.key, self.body(), IfMatch=self.etag)
            except RegistryError:
                continue  # a passing outage: the next beat tries again, within the lease
            if etag is None:
                self.lost = True
                return
            self.etag = etag

    def stop(self) -> None:
        self._done.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
