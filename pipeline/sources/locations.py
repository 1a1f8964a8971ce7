"""What kind of place ``data.source`` (or ``data.labels``) names: a local path (a plain
path or a ``file://`` URL), an http(s) URL, an ``s3://`` object or prefix, or a builtin.

Read by download, which fetches the source, and by the fingerprint, which only looks at
it: one reading of a source's name for both.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.errors import ConfigError
from pipeline.sources import builtin

REMOTE_SCHEMES = ("http", "https", "s3")


def scheme(source: str) -> str:
    """``http``, ``https``, ``s3``, ``builtin`` or ``local``."""
    if source.startswith(builtin.PREFIX):
        return "builtin"
    parsed = urlparse(source)
    return parsed.scheme if parsed.scheme in REMOTE_SCHEMES else "local"


def resolve_local(source: str, key: str = "data.source") -> Path | None:
    """The local path a source names (a plain path or a ``file://`` URL), else None (a URL to
    fetch, or a builtin). ``key`` is the params key errors name."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{key}: file:// URL with a remote host is not supported: {source}")
        return Path(unquote(parsed.path))
    if parsed.scheme in REMOTE_SCHEMES or source.startswith(builtin.PREFIX):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:  # C:\ is a drive, not a scheme
        raise ConfigError(
            f"{key}: unsupported scheme {parsed.scheme!r} in {source!r}; use an http(s)://, "
            "s3:// or file:// URL, a local path, or "
            + ", ".join(builtin.PREFIX + b for b in builtin.BUILTINS)
        )
    return Path(source).expanduser()
