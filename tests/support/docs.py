"""The project's Markdown as the tests read it: its command blocks marked runnable, and its
relative links.

A fenced block is runnable when the line right above its fence is a marker:

- ``<!-- runnable -->``: ``tests/test_docs.py`` runs it (bash) in a copy of the project and
  it must exit 0, so only cheap commands carry it;
- ``<!-- runnable by tests/test_x.py -->``: that test runs it, on the workspace it builds
  anyway (a whole pipeline, an exported model), reading it through :func:`blocks_run_by`,
  so a block moved to another page is still the one it runs.

A link is relative when it names no scheme (``http:``, ``mailto:``): its file must exist,
and its ``#anchor`` must be a heading of that file (GitHub's slugs) or an HTML ``id``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tests.support.project import REPO_ROOT

_MARKER = re.compile(r"^<!--\s*runnable(?:\s+by\s+(\S+))?\s*-->\s*$")
_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_INLINE_CODE = re.compile(r"(`+).*?\1")
_HTML_ID = re.compile(r"""<[^>]+\s(?:id|name)=["']([^"']+)["']""")


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    """The Markdown a user reads: the top-level pages and ``docs/``."""
    return sorted([*root.glob("*.md"), *(root / "docs").glob("*.md")])


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it is, its language, its text and its marker."""

    path: Path
    line: int  # of the opening fence, from 1
    lang: str
    code: str
    runnable: bool
    run_by: str | None  # the test that runs it; None: tests/test_docs.py itself

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT).as_posix()}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, marker = i, _MARKER.match(lines[i - 1]) if i else None
        i += 1
        while i < len(lines) and not lines[i].startswith(fence.group(1)):
            i += 1
        code = "\n".join(lines[start + 1 : i]) + "\n"
        found.append(
            Block(
                path,
                start + 1,
                fence.group(2),
                code,
                marker is not None,
                marker.group(1) if marker else None,
            )
        )
        i += 1
    return found


def runnable_blocks(root: Path = REPO_ROOT) -> list[Block]:
    return [b for path in doc_files(root) for b in blocks(path) if b.runnable]


def blocks_run_by(test_file: str) -> list[Block]:
    """The blocks whose marker names ``test_file`` (``tests/test_x.py``), in page order."""
    return [b for b in runnable_blocks() if b.run_by == test_file]


def prose(path: Path, keep_code: bool = False) -> list[tuple[int, str]]:
    """``path``'s lines outside fenced blocks, with their numbers; inline code removed
    unless ``keep_code``."""
    out, fence = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and line.startswith(fence):
            fence = None
        elif fence is None:
            out.append((number, line if keep_code else _INLINE_CODE.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to
    hyphens (letters of any script, digits, ``-`` and ``_`` kept)."""
    text = re.sub(r"`|\*\*|__|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors ``path`` defines: its headings' slugs (repeats numbered as GitHub does)
    and HTML ``id``/``name`` attributes."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose(path, keep_code=True):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(_HTML_ID.findall(line))
    return found


def broken_links(path: Path) -> list[str]:
    """``path``'s relative links whose file or anchor is missing, as ``file:line: target``."""
    problems = []
    for number, line in prose(path):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where} (no such file)")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} (no heading #{anchor} in {dest.name})")
    return problems
