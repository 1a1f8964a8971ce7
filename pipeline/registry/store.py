"""A model registry laid out as files on a folder or an S3 prefix, shaped like MLflow's:
a registered model ``name``, integer versions, and aliases (``production``).

Layout (docs/registry.md)::

    <url>/<name>/versions/<n>/model.onnx        the fp32 file (+ model.int8.onnx)
    <url>/<name>/versions/<n>/images.parquet    sha256, label, split of its data
    <url>/<name>/versions/<n>/version.json      lineage and checksums, written last
    <url>/<name>/versions/<n>.claim             who took number n (created exclusively)
    <url>/<name>/aliases/production.json        {version, sha256, file, history, ...}
    <url>/<name>/lock                           one promoter at a time

A version exists once its ``version.json`` does: it is written after every file it
lists, with their sha256, so a crash leaves at most a folder without one, which nothing
reads. The alias is replaced in one step (rename; one PUT) and only to a version whose
files were read back and matched their checksums; it carries the previous productions
(``history``), so rolling back is the same one-step write. Readers verify the sha256 of
what they download before loading it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.registry.backends import RegistryError, Store, open_store

PRODUCTION = "production"
MODEL_FILE, INT8_FILE, IMAGES_FILE, VERSION_FILE = (
    "model.onnx",
    "model.int8.onnx",
    "images.parquet",
    "version.json",
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Alias:
    """What an alias points at: a version and the sha256 of its model file."""

    version: int
    sha256: str
    file: str  # relative to <url>/<name>
    set_at: str
    reason: str
    history: tuple[dict, ...]  # earlier targets, oldest first

    @classmethod
    def parse(cls, data: bytes, where: str) -> Alias:
        try:
            raw = json.loads(data)
            return cls(
                int(raw["version"]),
                str(raw["sha256"]),
                str(raw["file"]),
                str(raw.get("set_at", "")),
                str(raw.get("reason", "")),
                tuple(raw.get("history", [])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{where}: not an alias file ({exc})") from None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "sha256": self.sha256,
                "file": self.file,
                "set_at": self.set_at,
                "reason": self.reason,
                "history": list(self.history),
            },
            indent=1,
        ).encode()


class Registry:
    """One registered model in the registry at ``url``."""

    def __init__(self, url: str, name: str, store: Store | None = None) -> None:
        self.url, self.name = url, name
        self.store = store or open_store(url)

    def __repr__(self) -> str:
        return f"Registry({self.url!r}, {self.name!r})"

    # Keys
    def _key(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def version_key(self, version: int, file: str) -> str:
        return self._key("versions", str(version), file)

    def where(self) -> str:
        return f"{self.url.rstrip('/')}/{self.name}"

    # Reading
    def check(self) -> None:
        """Reach the registry once: RegistryError naming the URL when it is down."""
        self.store.check()
        self.store.children(self._key("aliases"))

    def alias(self, alias: str = PRODUCTION) -> Alias | None:
        data = self.store.read(self._key("aliases", f"{alias}.json"))
        return None if data is None else Alias.parse(data, f"{self.where()}/aliases/{alias}.json")

    def versions(self) -> list[int]:
        """The version numbers taken (complete or not), ascending."""
        numbers = []
        for child in self.store.children(self._key("versions")):
            stem = child.removesuffix(".claim")
            if stem.isdigit():
                numbers.append(int(stem))
        return sorted(set(numbers))

    def version(self, version: int) -> dict | None:
        """Version ``version``'s record, or None when it was never completed."""
        data = self.store.read(self.version_key(version, VERSION_FILE))
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise RegistryError(
                f"{self.where()}/versions/{version}/{VERSION_FILE}: not JSON"
            ) from None

    def fetch(self, version: int, file: str, expected_sha256: str, into: Path) -> Path:
        """Download a version's ``file`` into ``into`` (a new file) and check its sha256."""
        key = self.version_key(version, file)
        if not self.store.download(key, into):
            raise RegistryError(f"{self.where()}/versions/{version}/{file}: missing")
        actual = sha256_of(into)
        if actual != expected_sha256:
            into.unlink()
            raise RegistryError(
                f"{self.where()}/versions/{version}/{file}: sha256 {actual} differs from "
                f"{expected_sha256} recorded for it"
            )
        return into

    def verify(self, version: int) -> dict:
        """Read every file of a version back and match it to its record; the record."""
        record = self.version(version)
        if record is None:
            raise RegistryError(f"{self.where()}: version {version} is incomplete or absent")
        with tempfile.TemporaryDirectory(prefix="registry-verify-") as tmp:
            for file, entry in record["files"].items():
                self.fetch(version, file, entry["sha256"], Path(tmp) / file)
        return record

    # Writing (callers hold the lock: ``with registry.locked(...)``)
    def locked(self, timeout_s: float, lease_s: float) -> contextlib.AbstractContextManager:
        return self.store.locked(self._key("lock"), timeout_s, lease_s)

    def claim_version(self) -> int:
        """The next free version number, taken exclusively (two promoters never share one)."""
        taken = self.versions()
        candidate = (taken[-1] if taken else 0) + 1
        while True:
            body = json.dumps({"claimed_at": now()}).encode()
            if self.store.create(self._key("versions", f"{candidate}.claim"), body):
                return candidate
            candidate += 1

    def register(self, files: dict[str, Path], record: dict) -> tuple[int, dict]:
        """A new version holding ``files`` (name → local path) with ``record`` (lineage,
        metrics, decision); its sha256s are added. ``version.json`` is written last, then
        every file is read back and checked. Returns the number and the full record."""
        version = self.claim_version()
        entries = {}
        for name, path in files.items():
            entries[name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
            self.store.upload(self.version_key(version, name), path)
        full = {
            "name": self.name,
            "version": version,
            "created_at": now(),
            **record,
            "files": entries,
        }
        self.store.write(
            self.version_key(version, VERSION_FILE), json.dumps(full, indent=1).encode()
        )
        return version, self.verify(version)

    def set_alias(
        self, version: int, reason: str, alias: str = PRODUCTION, verified: dict | None = None
    ) -> Alias:
        """Point ``alias`` at ``version`` once its files are read back and verified (here,
        or by ``register``, which returned ``verified``); the previous target joins the
        history (for rollback)."""
        record = verified if verified is not None else self.verify(version)
        previous = self.alias(alias)
        history = () if previous is None else (*previous.history, _entry(previous))
        return self._write_alias(record, reason, history, alias)

    def rollback(self, alias: str = PRODUCTION) -> Alias:
        """Point ``alias`` back at the version it pointed at before (its history's last)."""
        current = self.alias(alias)
        if current is None or not current.history:
            raise RegistryError(f"{self.where()}: {alias} has no earlier version to roll back to")
        target = current.history[-1]
        record = self.verify(int(target["version"]))
        reason = f"rolled back from version {current.version}"
        return self._write_alias(record, reason, current.history[:-1], alias)

    def _write_alias(self, record: dict, reason: str, history: tuple, alias: str) -> Alias:
        target = Alias(
            version=int(record["version"]),
            sha256=record["files"][MODEL_FILE]["sha256"],
            file=f"versions/{record['version']}/{MODEL_FILE}",
            set_at=now(),
            reason=reason,
            history=history,
        )
        self.store.write(self._key("aliases", f"{alias}.json"), target.to_json())
        return target


def _entry(alias: Alias) -> dict:
    return {"version": alias.version, "sha256": alias.sha256, "set_at": alias.set_at}


# Model references: what `predict --model` and FollowedModel accept
@dataclass(frozen=True)
class ModelRef:
    """``<registry url>#<name>@<alias>``: a registered model's alias in a registry."""

    url: str
    name: str
    alias: str = PRODUCTION

    def registry(self) -> Registry:
        return Registry(self.url, self.name)

    def __str__(self) -> str:
        return f"{self.url}#{self.name}@{self.alias}"


def parse_ref(text: str) -> ModelRef:
    """``URL#NAME`` or ``URL#NAME@ALIAS`` (alias: production)."""
    url, sep, rest = text.partition("#")
    if not sep or not url or not rest:
        raise RegistryError(f"{text!r}: expected URL#NAME or URL#NAME@ALIAS")
    name, _, alias = rest.partition("@")
    return ModelRef(url, name, alias or PRODUCTION)


def default_cache() -> Path:
    """Where downloaded models are kept by sha256: $XDG_CACHE_HOME or ~/.cache."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transfer-pipeline" / "models"


@dataclass(frozen=True)
class Resolved:
    """An alias resolved to a local, verified file."""

    ref: ModelRef
    version: int
    sha256: str
    path: Path


def resolve(ref: ModelRef, cache: Path | None = None) -> Resolved:
    """The alias's current version, downloaded (once per sha256) into ``cache`` and
    verified; a cached file is re-hashed before it is trusted."""
    registry = ref.registry()
    target = registry.alias(ref.alias)
    if target is None:
        raise RegistryError(f"{registry.where()}: no alias {ref.alias!r} (nothing promoted yet)")
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{target.sha256}.onnx"
    if path.is_file() and sha256_of(path) == target.sha256:
        return Resolved(ref, target.version, target.sha256, path)
    with _temp_in(cache) as tmp:
        registry.fetch(target.version, MODEL_FILE, target.sha256, tmp)
        tmp.replace(path)
    return Resolved(ref, target.version, target.sha256, path)


@contextlib.contextmanager
def _temp_in(folder: Path) -> Iterator[Path]:
    import uuid

    tmp = folder / f".download-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
