"""Hostile archives and files through the real stages (RELIABILITY.md, issue #7 item 4).

Each case builds a hostile input in ``tmp_path/src``, points ``data.source`` at it and runs
``python -m pipeline download`` (then validate and split where the case gets that far) in
``tmp_path/ws``, as DVC would. Every trial asserts the documented behaviour:

* refused: the stage fails, its message names the archive and the member (or file) and
  the reason; the previous ``data/raw`` is untouched and no temporary folder is left;
* quarantined: validate passes, ``metrics/quarantine.csv`` gives the file and its reason;
* accepted: the stage passes and the outputs say what was done;

and, for every trial, that nothing changed in ``tmp_path`` outside the workspace (the
traversal cases aim at named files in ``tmp_path/outside``), that the workspace holds
only the stage's own outputs, and that the stage process (children included) peaked
under 512 MB resident.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import dhash, load_rgb
from pipeline.data.rawstore import RawStore
from pipeline.errors import DataError
from pipeline.sources.archives import UnsafeArchiveError, extract_archive
from pipeline.stages import download, validate
from tests.support.faults import FULL, record, trials
from tests.support.images import create_image_folder, noise_image
from tests.support.project import (
    changed,
    copy_project,
    dvc,
    git,
    params_from,
    raw_keys,
    set_params,
    split_rows,
    tool_env,
    write_params,
)

pytestmark = pytest.mark.faults

PEAK_MB = 512
MB = 1_000_000
TAR_MODES = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}
# The formats and the hostile member's position among the good ones, per trial.
FORMATS = ["zip", *TAR_MODES] if FULL else ["zip", "tar.gz"]
POSITIONS = ["first", "middle", "last"] if FULL else ["last"]
# What a stage may write in the workspace: its outputs, its run log and params.yaml.
ALLOWED_TOP = {"params.yaml", "data", "metrics", "reports", "logs"}


# --- running a stage and checking around it ------------------------------------------


@dataclass(frozen=True)
class Ran:
    rc: int
    output: str
    peak_mb: float


# Runs the stage as its child and reports the child's peak RSS. A process started straight
# from this test process would not do: Linux carries the parent's peak RSS into the child's
# ru_maxrss across fork and exec, so it would report this (larger) test process's peak.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "pipeline", sys.argv[1]])
_, status, usage = os.wait4(pid, 0)
print("@peak_kb", usage.ru_maxrss, flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_stage(ws: Path, stage: str) -> Ran:
    """``python -m pipeline <stage>`` in ``ws``: exit code, output, peak RSS in MB.

    The peak is from ``os.wait4`` in a small launcher: the stage process's own, with its
    reaped children (validate's process pool) included.
    """
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, stage],
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=tool_env(),
        timeout=600,
    )
    text = done.stdout.decode("utf-8", errors="replace")
    output, _, peak = text.rpartition("@peak_kb ")
    return Ran(done.returncode, output, int(peak) / 1024)


def tree_state(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (``skip`` left out) → (mode, size, mtime); links not followed."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            st = (here / name).lstat()
            state[(here / name).relative_to(root).as_posix()] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
            )
    return state


class Bench:
    """``tmp_path`` laid out as src/ (inputs), outside/ (targets) and ws/ (the workspace)."""

    def __init__(self, tmp_path: Path) -> None:
        self.root, self.src, self.ws = tmp_path, tmp_path / "src", tmp_path / "ws"
        self.outside = tmp_path / "outside"
        for folder in (self.src, self.ws, self.outside):
            folder.mkdir(exist_ok=True)
        (self.outside / "keep.txt").write_text("must stay as it is")
        self.peak_mb = 0.0

    def params(self, **sections) -> None:
        write_params(self.ws / "params.yaml", **sections)

    def stage(self, name: str) -> Ran:
        ran = run_stage(self.ws, name)
        self.peak_mb = max(self.peak_mb, ran.peak_mb)
        return ran

    def around(self) -> dict:
        return tree_state(self.root, skip=self.ws)

    def raw(self) -> dict[str, bytes]:
        raw = self.ws / "data" / "raw"
        return {
            p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.rglob("*") if p.is_file()
        }

    def stray(self) -> list[str]:
        """Paths in the workspace that no stage should leave: unknown top-level entries,
        hidden temporaries (``.download-*``, ``.raw.tmp-*``) anywhere."""
        found = [p.name for p in self.ws.iterdir() if p.name not in ALLOWED_TOP]
        found += [p.relative_to(self.ws).as_posix() for p in self.ws.rglob(".*") if p.name != "."]
        return found


def problems_of_refusal(
    bench: Bench, ran: Ran, before: dict, raw_before: dict, *fragments: str
) -> list[str]:
    """What is wrong with a refused download: empty when it was refused as documented."""
    problems = []
    if ran.rc == 0:
        problems.append("the stage succeeded")
    problems += [f"message lacks {f!r}" for f in fragments if f not in ran.output]
    if bench.raw() != raw_before:
        problems.append("data/raw changed")
    if bench.around() != before:
        problems.append("files changed outside the workspace")
    if bench.stray():
        problems.append(f"left behind: {bench.stray()}")
    if ran.peak_mb >= PEAK_MB:
        problems.append(f"peak RSS {ran.peak_mb:.0f} MB")
    if problems:
        problems.append("output tail: " + ran.output[-1500:])
    return problems


def tally(fault: str, outcomes: list[list[str]], **details) -> None:
    """Record then assert: every trial's problem list must be empty.

    Data lost: trials that changed the previous ``data/raw`` or left a partial output.
    """
    passed = sum(not p for p in outcomes)
    lost = sum(any(p.startswith(("data/raw changed", "left behind")) for p in o) for o in outcomes)
    record(fault, len(outcomes), passed, lost, **details)
    failed = [p for p in outcomes if p]
    assert not failed, f"{fault}: {len(failed)}/{len(outcomes)} trials failed: {failed[0]}"


# --- archive builders ----------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An archive member: a file, folder, link or special file, in either format."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file, dir, symlink, hardlink, chr, blk, fifo
    link: str = ""
    size: int | None = None  # with data=b"": this many zero bytes, streamed


_TAR_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_ZIP_MODES = {
    "file": stat.S_IFREG | 0o644,
    "dir": stat.S_IFDIR | 0o755,
    "symlink": stat.S_IFLNK | 0o777,
    "chr": stat.S_IFCHR | 0o644,
    "blk": stat.S_IFBLK | 0o644,
    "fifo": stat.S_IFIFO | 0o644,
}


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces, never held whole."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def write_archive(path: Path, fmt: str, members: Iterable[Member]) -> Path:
    if fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for m in members:
                info = zipfile.ZipInfo(m.name + ("/" if m.kind == "dir" else ""))
                info.create_system = 3  # unix, so the mode bits below count
                info.external_attr = _ZIP_MODES[m.kind] << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                if m.size is None:
                    zf.writestr(info, m.link.encode() if m.kind == "symlink" else m.data)
                else:
                    with zf.open(info, "w", force_zip64=True) as dst:
                        shutil.copyfileobj(_Zeros(m.size), dst, 1 << 20)
        return path
    with tarfile.open(path, TAR_MODES[fmt]) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname = _TAR_TYPES[m.kind], m.link
            info.mode = 0o755 if m.kind == "dir" else 0o644
            if m.kind == "file":
                info.size = len(m.data) if m.size is None else m.size
                body = io.BytesIO(m.data) if m.size is None else _Zeros(m.size)
                tf.addfile(info, body)
            else:
                tf.addfile(info)
    return path


@cache
def png_bytes(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    out = io.BytesIO()
    noise_image(seed, size).save(out, "PNG")
    return out.getvalue()


def good_members(classes=("cat", "dog"), per_class: int = 5, seed: int = 0) -> list[Member]:
    """A usable dataset under ``images/``: what every hostile archive also carries."""
    return [
        Member(f"images/{c}/img_{i:02d}.png", png_bytes(seed * 1000 + k * 100 + i))
        for k, c in enumerate(classes)
        for i in range(per_class)
    ]


def place(good: list[Member], evil: list[Member], position: str) -> list[Member]:
    at = {"first": 0, "middle": len(good) // 2, "last": len(good)}[position]
    return good[:at] + evil + good[at:]


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return Bench(tmp_path)


def previous_raw(bench: Bench) -> dict[str, bytes]:
    """A good download first (in this process: quicker), so each refusal can show that the
    previous output survives."""
    good = write_archive(bench.src / "good.zip", "zip", good_members())
    params = params_from({"data": {"source": str(good)}})
    download.run(params.paths.under(bench.ws), params.data, params.download)
    return bench.raw()


# --- archive members that try to escape, or are not plain files ----------------------

# Each case: the hostile members (given the bench), the formats it applies to, the member
# the refusal must name, and the reason it must give.
Escape = Callable[[Bench], list[Member]]
DEPTH = "../" * 6  # from data/.download-*/extract/images/cat up to tmp_path


def _traversal(b: Bench) -> list[Member]:
    return [Member(f"images/cat/{DEPTH}outside/evil.txt", b"pwned")]


def _absolute(b: Bench) -> list[Member]:
    return [Member(str(b.outside / "abs_evil.txt"), b"pwned")]


def _symlink(b: Bench) -> list[Member]:
    return [Member("images/cat/link.png", kind="symlink", link=f"{DEPTH}outside/keep.txt")]


def _hardlink(b: Bench) -> list[Member]:
    return [Member("images/cat/hard.png", kind="hardlink", link=str(b.outside / "keep.txt"))]


def _two_step(b: Bench) -> list[Member]:
    return [
        Member("images/cat/a", kind="symlink", link=str(b.outside)),
        Member("images/cat/a/evil.png", b"pwned"),
    ]


def _two_step_dotdot(b: Bench) -> list[Member]:
    return [
        Member("images/up", kind="symlink", link=".."),
        Member("images/up/up", kind="symlink", link=".."),
        Member(f"images/up/up/{'../' * 3}outside/evil.png", b"pwned"),
    ]


def _device(b: Bench) -> list[Member]:
    return [Member("images/cat/tty.png", kind="chr")]


def _block(b: Bench) -> list[Member]:
    return [Member("images/cat/disk.png", kind="blk")]


def _fifo(b: Bench) -> list[Member]:
    return [Member("images/cat/pipe.png", kind="fifo")]


ALL = ["zip", *TAR_MODES]
ESCAPES: list[tuple[str, Escape, list[str], str, str]] = [
    ("path traversal (../) member", _traversal, ALL, "outside/evil.txt", "'..' in the path"),
    ("absolute-path member", _absolute, ALL, "abs_evil.txt", "absolute path"),
    ("symlink escaping the target", _symlink, ALL, "images/cat/link.png", "symbolic link"),
    (
        "hardlink escaping the target",
        _hardlink,
        list(TAR_MODES),
        "images/cat/hard.png",
        "hard link",
    ),
    (
        "two-step trick: link a -> outside, then a/evil",
        _two_step,
        ALL,
        "images/cat/a",
        "symbolic link",
    ),
    (
        "two-step trick: link up -> .., then up/up/../../../outside",
        _two_step_dotdot,
        ALL,
        "images/up",
        "symbolic link",
    ),
    ("character device member", _device, ALL, "images/cat/tty.png", "device file|special file"),
    ("block device member", _block, ALL, "images/cat/disk.png", "device file|special file"),
    ("FIFO member", _fifo, ALL, "images/cat/pipe.png", "FIFO|special file"),
]


@pytest.mark.parametrize(
    ("fault", "evil", "formats", "member", "reason"), ESCAPES, ids=[c[0] for c in ESCAPES]
)
def test_escaping_and_special_members_are_refused(bench, fault, evil, formats, member, reason):
    raw_before = previous_raw(bench)
    outcomes = []
    for fmt in [f for f in FORMATS if f in formats] or formats[:1]:
        for position in POSITIONS:
            members = place(good_members(), evil(bench), position)
            archive = write_archive(bench.src / f"evil-{position}.{fmt}", fmt, members)
            bench.params(data={"source": str(archive)})
            before = bench.around()
            ran = bench.stage("download")
            problems = problems_of_refusal(bench, ran, before, raw_before, str(archive), member)
            if not any(r in ran.output for r in reason.split("|")):
                problems.append(f"message lacks {reason!r}: {ran.output[-800:]}")
            outcomes.append(problems)
    for target in ("evil.txt", "abs_evil.txt", "evil.png"):
        assert not (bench.outside / target).exists()
    assert (bench.outside / "keep.txt").read_text() == "must stay as it is"
    tally(f"hostile archive: {fault}", outcomes, peak_rss_mb=round(bench.peak_mb))


def test_own_precheck_refuses_without_tarfiles_data_filter(tmp_path, monkeypatch):
    """Were the ``data`` filter bypassed (CVE-2025-4517) or absent (older Python), the
    module's own member checks still refuse every escaping or special tar member."""
    bench = Bench(tmp_path)
    monkeypatch.delattr(tarfile, "data_filter", raising=False)  # absent before 3.11.4
    outcomes = []
    for fault, evil, _formats, member, _reason in ESCAPES:
        archive = write_archive(
            tmp_path / "evil.tar", "tar", place(good_members(), evil(bench), "last")
        )
        target = tmp_path / "out"
        try:
            extract_archive(archive, target, max_bytes=MB, max_files=100)
            outcomes.append([f"{fault}: extracted"])
        except UnsafeArchiveError as exc:
            named = repr(member) in str(exc) or member in str(exc)
            outcomes.append([] if named and not target.exists() else [f"{fault}: {exc}"])
        archive.unlink()
    assert not list(bench.outside.glob("evil*"))
    tally("hostile archive: own pre-check with tarfile's data filter removed", outcomes)


def test_tarfiles_data_filter_is_consulted_as_a_second_opinion(tmp_path, monkeypatch):
    """A member the filter refuses is refused, naming the filter: it is wired in, not only
    imported. (The stand-in filter refuses one benign name, as a bypass fix might.)"""

    def strict_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        if member.name.endswith("img_03.png"):
            raise tarfile.OutsideDestinationError(member, os.path.join(dest, member.name))
        return member

    if not hasattr(tarfile, "data_filter"):
        pytest.skip(
            f"Python {platform.python_version()} has no tarfile data filter (3.11.4+); "
            "test_own_precheck_refuses_without_tarfiles_data_filter covers this Python"
        )
    monkeypatch.setattr(tarfile, "data_filter", strict_filter)
    archive = write_archive(tmp_path / "a.tar", "tar", good_members())
    with pytest.raises(UnsafeArchiveError, match="img_03.png.*tarfile's data filter"):
        extract_archive(archive, tmp_path / "out", max_bytes=MB, max_files=100)
    assert not (tmp_path / "out").exists()


# --- size: many members, bombs, overlapping entries, nesting --------------------------


def test_ten_thousand_members(bench):
    """10k files (Caltech has ~9k) within download.max_files are accepted in bounded memory;
    over a lowered max_files they are refused, naming the first member over the limit."""
    n, classes = 10_000, 10
    tiny = [png_bytes(i, (16, 16)) for i in range(n)] if FULL else [png_bytes(0, (16, 16))] * n
    members = [Member(f"images/c{i % classes}/{i:05d}.png", tiny[i]) for i in range(n)]
    outcomes = []
    for fmt in ["zip", "tar.gz"] if FULL else ["tar.gz"]:
        archive = write_archive(bench.src / f"many.{fmt}", fmt, members)
        bench.params(data={"source": str(archive)})
        before = bench.around()
        ran = bench.stage("download")
        problems = [] if ran.rc == 0 else [ran.output[-1500:]]
        counts = json.loads((bench.ws / "metrics/download.json").read_text())
        stored = raw_keys(bench.ws / "data/raw") if ran.rc == 0 else set()
        if (counts["files"], counts["classes"]) != (n, classes) or len(stored) != n:
            problems.append(f"download.json says {counts['files']} files")
        if bench.around() != before or bench.stray() or ran.peak_mb >= PEAK_MB:
            problems.append(f"outside changed / stray {bench.stray()} / {ran.peak_mb:.0f} MB")
        outcomes.append(problems)

        raw_before = bench.raw()
        bench.params(data={"source": str(archive)}, download={"max_files": 5000})
        ran = bench.stage("download")
        outcomes.append(
            problems_of_refusal(
                bench, ran, before, raw_before, "more than 5000 files", "download.max_files"
            )
        )
    if FULL:  # and validate takes all 10k, its process pool included, in bounded memory
        bench.params(data={"source": str(archive)})
        ran = bench.stage("validate")
        metrics = json.loads((bench.ws / "metrics/validate.json").read_text())
        ok = ran.rc == 0 and metrics["images"] == n and ran.peak_mb < PEAK_MB
        outcomes.append([] if ok else [ran.output[-1500:]])
    tally(
        "hostile archive: 10k members (accepted; refused over download.max_files)",
        outcomes,
        peak_rss_mb=round(bench.peak_mb),
    )


def zip_with_lying_size(path: Path, member: str, claimed: int) -> Path:
    """Rewrite ``member``'s uncompressed size in the central directory to ``claimed``."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    at = data.index(b"PK\x01\x02")
    while data[at + 46 : at + 46 + len(name)] != name:
        at = data.index(b"PK\x01\x02", at + 4)
    struct.pack_into("<L", data, at + 24, claimed)
    path.write_bytes(bytes(data))
    return path


def test_zip_bombs_stop_at_the_byte_limit(bench):
    """64 MB of zeros compress ~1000:1. With download.max_extracted_bytes at 16 MB a zip is
    refused from its declared sizes before a byte is written; a tar.gz (sizes unknown up
    front) is refused when the bytes actually written pass the limit; a zip whose central
    directory understates the size is refused as corrupt when the CRC does not match."""
    raw_before = previous_raw(bench)
    size, limit = 64 * MB, 16 * MB
    bomb = Member("images/cat/zeros.png", size=size)
    outcomes, ratios = [], []
    formats = ["zip", *TAR_MODES] if FULL else ["zip", "tar.gz"]
    for fmt in formats:
        for position in POSITIONS:
            archive = write_archive(
                bench.src / f"bomb-{position}.{fmt}", fmt, place(good_members(), [bomb], position)
            )
            ratios.append(size / archive.stat().st_size)
            bench.params(data={"source": str(archive)}, download={"max_extracted_bytes": limit})
            before = bench.around()
            ran = bench.stage("download")
            outcomes.append(
                problems_of_refusal(
                    bench,
                    ran,
                    before,
                    raw_before,
                    str(archive),
                    "'images/cat/zeros.png'",
                    f"more than {limit} bytes",
                    "download.max_extracted_bytes",
                )
            )
    liar = write_archive(bench.src / "liar.zip", "zip", [*good_members(), bomb])
    zip_with_lying_size(liar, bomb.name, 1000)
    bench.params(data={"source": str(liar)}, download={"max_extracted_bytes": limit})
    before = bench.around()
    ran = bench.stage("download")
    outcomes.append(
        problems_of_refusal(bench, ran, before, raw_before, str(liar), "corrupt", bomb.name)
    )
    tally(
        "zip bomb: ~1000:1 member over download.max_extracted_bytes",
        outcomes,
        peak_rss_mb=round(bench.peak_mb),
        compression_ratio=round(max(ratios)),
    )


def _lfh(name: bytes, crc: int, csize: int, usize: int) -> bytes:
    return (
        struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, csize, usize, len(name), 0)
        + name
    )


def overlapping_zip(path: Path, entries: int, kernel_mb: int) -> tuple[Path, int]:
    """Fifield's "better zip bomb" (quoted overlap): one deflated kernel of zeros shared by
    every entry; entry i's data is a stored block quoting entry i+1's local header, then
    entry i+1's data. Returns the path and the bytes it expands to."""
    names = [f"images/cat/{i:03d}.png".encode() for i in range(entries)]
    zeros = kernel_mb * MB
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    kernel = squeeze.compress(bytes(zeros)) + squeeze.flush()
    zeros_crc = zlib.crc32(bytes(zeros))
    headers: list[bytes] = [b""] * entries
    sizes: list[tuple[int, int, int]] = [(0, 0, 0)] * entries  # crc, csize, usize
    sizes[-1] = (zeros_crc, len(kernel), zeros)
    headers[-1] = _lfh(names[-1], *sizes[-1])
    for i in range(entries - 2, -1, -1):
        quoted = b"".join(headers[i + 1 :])  # what entry i unpacks before the zeros
        crc = zlib.crc32(bytes(zeros), zlib.crc32(quoted))
        _, csize, usize = sizes[i + 1]
        sizes[i] = (crc, 5 + len(headers[i + 1]) + csize, len(headers[i + 1]) + usize)
        headers[i] = _lfh(names[i], *sizes[i])
    body, offsets = b"", []
    for i in range(entries):
        offsets.append(len(body))
        body += headers[i]
        if i < entries - 1:
            n = len(headers[i + 1])
            body += b"\x00" + struct.pack("<HH", n, n ^ 0xFFFF)  # stored, not final
    body += kernel
    central = b"".join(
        struct.pack(
            "<4s6H3L5H2L",
            b"PK\x01\x02",
            20,
            20,
            0,
            8,
            0,
            0,
            *sizes[i],
            len(names[i]),
            0,
            0,
            0,
            0,
            0,
            offsets[i],
        )
        + names[i]
        for i in range(entries)
    )
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, len(central), len(body), 0)
    path.write_bytes(body + central + end)
    return path, sum(s[2] for s in sizes)


def same_offset_zip(path: Path, entries: int) -> Path:
    """Many central-directory entries, one local header: every entry is the same data."""
    one = io.BytesIO()
    with zipfile.ZipFile(one, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images/cat/000.png", bytes(8 * MB))
    data = one.getvalue()
    cd = data.index(b"PK\x01\x02")
    fixed = bytearray(data[cd : cd + 46])
    central = b""
    for i in range(entries):
        name = f"images/cat/{i:03d}.png".encode()
        struct.pack_into("<3H", fixed, 28, len(name), 0, 0)  # name, extra, comment lengths
        central += bytes(fixed) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, len(central), cd, 0)
    path.write_bytes(data[:cd] + central + end)
    return path


def test_overlapping_entry_zip_bombs_are_refused_before_extraction(bench):
    """Entries that share compressed data are refused from the central directory, at the
    default (generous) byte limit, before anything is written."""
    raw_before = previous_raw(bench)
    outcomes = []
    sizes = [(16, 2), (64, 4)] if FULL else [(16, 2)]
    for entries, kernel_mb in sizes:
        archive, expands = overlapping_zip(bench.src / f"overlap-{entries}.zip", entries, kernel_mb)
        bomb_kb = archive.stat().st_size // 1000
        # The bomb is real: a zipfile without overlap detection unpacks the entries, CRCs
        # and all; a Python with it (Debian's 3.11.2 has the backport) refuses on read, after
        # the central directory was accepted. The refusal below must come first either way.
        with zipfile.ZipFile(archive) as zf:
            try:
                assert len(zf.read(f"images/cat/{entries - 2:03d}.png")) > kernel_mb * MB
            except zipfile.BadZipFile as exc:
                assert "Overlapped entries" in str(exc)
        bench.params(data={"source": str(archive)})
        before = bench.around()
        ran = bench.stage("download")
        outcomes.append(
            problems_of_refusal(
                bench,
                ran,
                before,
                raw_before,
                str(archive),
                "'images/cat/001.png'",
                "overlaps member 'images/cat/000.png'",
            )
        )
    archive = same_offset_zip(bench.src / "same-offset.zip", 50)
    bench.params(data={"source": str(archive)})
    before = bench.around()
    ran = bench.stage("download")
    outcomes.append(
        problems_of_refusal(bench, ran, before, raw_before, str(archive), "overlaps member")
    )
    tally(
        "zip bomb: overlapping entries (Fifield quoted overlap; shared offset)",
        outcomes,
        peak_rss_mb=round(bench.peak_mb),
        expands_to_mb=expands // MB,
        archive_kb=bomb_kb,
    )


def test_deeply_nested_archives_are_unpacked_one_level_only(bench):
    """download unpacks one nested archive deep (what Caltech needs): archives inside
    archives inside archives are never expanded, and the download fails saying so."""
    raw_before = previous_raw(bench)
    outcomes = []
    for depth in [3, 6] if FULL else [4]:
        inner = write_archive(bench.src / "level0.tar.gz", "tar.gz", good_members())
        for level in range(1, depth):
            inner = write_archive(
                bench.src / f"level{level}.zip", "zip", [Member(inner.name, inner.read_bytes())]
            )
        bench.params(data={"source": str(inner)})
        before = bench.around()
        ran = bench.stage("download")
        outcomes.append(
            problems_of_refusal(
                bench, ran, before, raw_before, str(inner), "no nested archive holds images"
            )
        )
    tally(
        "nested-archive bomb: archives nested several levels deep",
        outcomes,
        peak_rss_mb=round(bench.peak_mb),
    )


def test_nested_archives_share_one_byte_limit(bench):
    """Eight nested archives of 6 MB each under a 16 MB download.max_extracted_bytes: the
    limit is for the whole download, so the third nested archive is refused."""
    raw_before = previous_raw(bench)
    nested = [
        Member(
            f"bundle/part{k}.tar.gz",
            write_archive(
                bench.src / f"part{k}.tar.gz",
                "tar.gz",
                [*good_members(seed=k), Member(f"images/cat/zeros{k}.png", size=6 * MB)],
            ).read_bytes(),
        )
        for k in range(8)
    ]
    archive = write_archive(bench.src / "wide.zip", "zip", nested)
    bench.params(data={"source": str(archive)}, download={"max_extracted_bytes": 16 * MB})
    before = bench.around()
    ran = bench.stage("download")
    outcomes = [
        problems_of_refusal(
            bench, ran, before, raw_before, "part2.tar.gz", "download.max_extracted_bytes"
        )
    ]
    tally(
        "nested-archive bomb: 8 nested archives, one shared byte limit",
        outcomes,
        peak_rss_mb=round(bench.peak_mb),
    )


# --- files that are not what they say, and classes that are odd -----------------------


@cache
def png_bomb(side: int = 20_000) -> bytes:
    """A valid side×side greyscale PNG of zeros: ~400 KB on disk, 400 MB decoded (1.2 GB
    as RGB)."""
    row = bytes(1 + side)  # filter byte + one row of zeros
    squeeze = zlib.compressobj(9)
    idat = b"".join(squeeze.compress(row * 100) for _ in range(side // 100)) + squeeze.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">L", len(data)) + kind + data + struct.pack(">L", zlib.crc32(kind + data))
        )

    header = struct.pack(">2L5B", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body></body></html>"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def smooth_image(seed: int, size=(256, 192)) -> Image.Image:
    """A photo-like image (smooth shapes): its difference hash survives resizing."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def jpeg_copy(img: Image.Image, scale: float, quality: int) -> bytes:
    out = io.BytesIO()
    w, h = img.size
    img.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS).save(
        out, "JPEG", quality=quality
    )
    return out.getvalue()


def near_duplicate_pair(seed: int) -> tuple[bytes, bytes, bytes]:
    """A PNG and two resized, re-encoded JPEG copies sharing its difference hash.

    A difference hash is equal for most such copies, not all (88% for 200 of these, the
    rest 1-2 bits off; see RELIABILITY.md): try seeds until the copies share it.
    """
    while True:
        img = smooth_image(seed)
        copies = [jpeg_copy(img, 0.75, 70), jpeg_copy(img, 0.6, 85)]
        if all(dhash(load_rgb(io.BytesIO(c))) == dhash(img) for c in copies):
            out = io.BytesIO()
            img.save(out, "PNG")
            return out.getvalue(), *copies
        seed += 1


def hostile_files_dataset(root: Path, seed: int) -> dict[str, str]:
    """Classes cat, dog, bird and an NFD-named café, plus the hostile files; returns
    what each planted file is, by its path under the class folder."""
    nfd = unicodedata.normalize("NFD", "café")
    create_image_folder(root, {"cat": 6, "dog": 6, "bird": 6, nfd: 6}, seed=seed)
    (root / "empty class").mkdir()
    (root / "cat" / "bomb.png").write_bytes(png_bomb())
    (root / "dog" / "page.jpg").write_bytes(HTML)
    (root / "bird" / "paper.jpg").write_bytes(PDF)
    shutil.copy(root / "cat" / "img_00.png", root / "dog" / "copy_of_cat.png")
    original, resized, reencoded = near_duplicate_pair(seed * 7 + 1)
    (root / "cat" / "photo.png").write_bytes(original)
    (root / "bird" / "photo_small.jpg").write_bytes(resized)
    (root / "cat" / "photo_again.jpg").write_bytes(reencoded)
    return {
        "cat/bomb.png": "decompression bomb",
        "dog/page.jpg": "not an image",
        "bird/paper.jpg": "not an image",
    }


def test_hostile_files_are_quarantined_and_duplicates_kept_together(bench):
    """One archive with a 20000x20000 PNG bomb, HTML and PDF files named .jpg, an empty and
    an NFD-named class, an exact copy and resized/re-encoded copies across classes, through
    download → validate → split."""
    outcomes = {k: [] for k in ("bomb", "fake", "nfd", "empty", "exact", "near")}
    for trial in range(trials(3, 1)):
        folder = bench.src / f"files{trial}"
        planted = hostile_files_dataset(folder, seed=trial)
        archive = bench.src / f"files{trial}.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(folder, arcname="images")
        bench.params(data={"source": str(archive)})
        before = bench.around()
        ran = {s: bench.stage(s) for s in ("download", "validate", "split")}
        ok = all(r.rc == 0 for r in ran.values())
        common = [] if ok else [r.output[-1500:] for r in ran.values() if r.rc]
        if bench.around() != before or bench.stray():
            common.append(f"outside changed or stray files {bench.stray()}")
        if max(r.peak_mb for r in ran.values()) >= PEAK_MB:
            common.append(f"peak RSS {[r.peak_mb for r in ran.values()]}")
        if not ok:
            for k in outcomes:
                outcomes[k].append(common)
            continue
        with open(bench.ws / "metrics/quarantine.csv", newline="", encoding="utf-8") as fh:
            reasons = {
                Path(r["path"]).relative_to("data/raw").as_posix(): r["reason"]
                for r in csv.DictReader(fh)
            }
        metrics = json.loads((bench.ws / "metrics/validate.json").read_text())
        downloaded = json.loads((bench.ws / "metrics/download.json").read_text())
        splits = split_rows(bench.ws)
        split_of = dict(zip(splits["path"], splits["split"], strict=True))

        def quarantined(path: str, why: str, reasons=reasons, split_of=split_of) -> list[str]:
            found = reasons.get(path, "")
            bad = [] if found.startswith(why) else [f"{path}: quarantined for {found!r}"]
            return bad + ([f"{path} in a split"] if f"data/raw/{path}" in split_of else [])

        outcomes["bomb"].append(common + quarantined("cat/bomb.png", planted["cat/bomb.png"]))
        outcomes["fake"].append(
            common
            + quarantined("dog/page.jpg", "not an image")
            + quarantined("bird/paper.jpg", "not an image")
        )
        names = set(RawStore.open(bench.ws / "data/raw").index["label"])
        nfc_ok = names == {"cat", "dog", "bird", "café"} and "café" in metrics["class_counts"]
        outcomes["nfd"].append(common + ([] if nfc_ok else [f"classes {names}"]))
        skipped = "'empty class' holds no files; skipping it" in ran["download"].output
        outcomes["empty"].append(
            common + ([] if skipped and downloaded["classes"] == 4 else ["empty class kept"])
        )
        exact = metrics["duplicate_examples"]
        same_split = split_of["data/raw/cat/img_00.png"] == split_of["data/raw/dog/copy_of_cat.png"]
        outcomes["exact"].append(
            common
            + ([] if [e["labels"] for e in exact] == [["cat", "dog"]] else [f"reported {exact}"])
            + ([] if same_split else ["exact copies in two splits"])
        )
        near = metrics["near_duplicate_examples"]
        trio = [
            "data/raw/bird/photo_small.jpg",
            "data/raw/cat/photo.png",
            "data/raw/cat/photo_again.jpg",
        ]
        outcomes["near"].append(
            common
            + ([] if [n["paths"] for n in near] == [trio] else [f"reported {near}"])
            + ([] if len({split_of[p] for p in trio}) == 1 else ["near copies in two splits"])
        )
    peak = round(bench.peak_mb)
    tally("hostile file: 20000x20000 PNG (decompression bomb)", outcomes["bomb"], peak_rss_mb=peak)
    tally("hostile file: HTML and PDF named .jpg", outcomes["fake"], peak_rss_mb=peak)
    tally("class names: one NFD class name (stored as NFC)", outcomes["nfd"], peak_rss_mb=peak)
    tally("class: empty folder (skipped with a warning)", outcomes["empty"], peak_rss_mb=peak)
    tally("duplicates: exact copy across classes", outcomes["exact"], peak_rss_mb=peak)
    tally(
        "duplicates: resized + re-encoded copies across classes and splits",
        outcomes["near"],
        peak_rss_mb=peak,
    )


def test_nfc_and_nfd_class_names_in_one_archive_are_refused(bench):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    outcomes = []
    for fmt in FORMATS:
        members = good_members() + [
            Member(f"images/{name}/img_{i}.png", png_bytes(500 + i))
            for name in (nfc, nfd)
            for i in range(5)
        ]
        archive = write_archive(bench.src / f"cafe.{fmt}", fmt, members)
        bench.params(data={"source": str(archive)})
        before = bench.around()
        ran = bench.stage("download")
        outcomes.append(
            problems_of_refusal(
                bench,
                ran,
                before,
                {},
                repr(nfc),
                repr(nfd),
                "same name after Unicode NFC normalisation",
            )
        )
    tally(
        "class names: NFC and NFD 'café' in one archive", outcomes, peak_rss_mb=round(bench.peak_mb)
    )


def test_tiny_and_fully_quarantined_classes_fail_validate_naming_them(bench):
    """A class with one image, and one whose only files are HTML named .jpg, fail the
    per-class minimum naming both; nothing DVC could cache is written."""
    folder = create_image_folder(bench.src / "images", {"cat": 6, "dog": 6, "lonely": 1})
    (folder / "ghost").mkdir()
    for i in range(6):
        (folder / "ghost" / f"img_{i}.jpg").write_bytes(HTML)
    bench.params(data={"source": str(folder)})
    before = bench.around()
    ran = [bench.stage("download"), bench.stage("validate")]
    message = ran[1].output
    problems = [] if ran[0].rc == 0 and ran[1].rc != 0 else ["validate passed"]
    for fragment in ("min_images_per_class=5", "'lonely'", "'ghost'", "'images': 0"):
        if fragment not in message:
            problems.append(f"message lacks {fragment!r}: {message[-1500:]}")
    for output in ("data/manifest", "metrics/validate.json", "metrics/classes.json"):
        if (bench.ws / output).exists():
            problems.append(f"{output} written by a failed validate")
    if bench.around() != before or bench.stray():
        problems.append(f"outside changed or stray {bench.stray()}")
    tally(
        "class: one image, or every file quarantined", [problems], peak_rss_mb=round(bench.peak_mb)
    )


# --- the set of classes changing between runs (issue #7 item 7) ----------------------


def test_class_change_fails_validate_until_allowed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = create_image_folder(tmp_path / "images", {"cat": 5, "dog": 5, "bird": 5})

    def run(allow: bool = False) -> dict:
        params = params_from(
            {"data": {"source": str(images)}, "validate": {"allow_class_change": allow}}
        )
        download.main(params)
        return validate.main(params)

    accepted = Path("metrics/classes.json")
    outcomes = []
    run()  # the first run accepts whatever it finds
    outcomes.append(
        []
        if json.loads(accepted.read_text())["classes"] == ["bird", "cat", "dog"]
        else [accepted.read_text()]
    )

    shutil.rmtree(images / "bird")
    create_image_folder(images, {"fish": 5, "owl": 5}, seed=9)
    with pytest.raises(DataError) as info:
        run()
    message = str(info.value)
    wanted = (
        "added 2 ['fish', 'owl']",
        "removed 1 ['bird']",
        "validate.allow_class_change",
        str(accepted),
    )
    outcomes.append([f"message lacks {w!r}: {message}" for w in wanted if w not in message])
    outcomes.append([] if "bird" in accepted.read_text() else ["a failed run moved the list"])

    metrics = run(allow=True)
    outcomes.append(
        []
        if metrics["classes"] == 4
        and json.loads(accepted.read_text())["classes"] == ["cat", "dog", "fish", "owl"]
        else [accepted.read_text()]
    )
    run()  # the same classes again: no flag needed
    accepted.write_text("{not json")
    with pytest.raises(DataError, match="classes.json: unreadable class list"):
        run()
    tally("classes changed since the last accepted run (validate)", outcomes)


@pytest.mark.slow
def test_class_change_through_dvc_repro(tmp_path):
    """Under ``dvc repro`` the accepted list survives DVC's removal of validate's outputs
    (persist: without it the second run would pass as a first run), a changed class set
    fails the stage, and (full mode) the flag lets it through."""
    repo = copy_project(tmp_path / "repo")
    git(repo, "init", "-q")
    images = create_image_folder(tmp_path / "images", {"cat": 5, "dog": 5, "fish": 5})
    set_params(repo, data={"source": str(images), "exclude_classes": ["fish"]})
    dvc(repo, "repro", "validate")
    set_params(repo, data={"exclude_classes": []})  # download reruns, with a class more
    done = subprocess.run(
        ["dvc", "repro", "validate"],
        cwd=repo,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    accepted = json.loads((repo / "metrics/classes.json").read_text())
    problems = []
    if done.returncode == 0 or "added 1 ['fish']" not in done.stdout + done.stderr:
        problems.append(f"repro passed or unclear: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    if accepted != {"source": {"source": str(images), "member": None}, "classes": ["cat", "dog"]}:
        problems.append(f"the failed run changed the accepted list to {accepted}")
    if FULL:  # the flag lets the change through, and DVC then finds everything up to date
        set_params(repo, validate={"allow_class_change": True})
        dvc(repo, "repro", "validate")
        after = json.loads((repo / "metrics/classes.json").read_text())
        status = changed(json.loads(dvc(repo, "status", "--json", "validate")))
        if after["classes"] != ["cat", "dog", "fish"] or status:
            problems.append(f"accepted list {after}, dvc status {status}")
        set_params(repo, validate={"allow_class_change": False})
    # Another dataset: its own classes are accepted with no flag (issue #16).
    other = create_image_folder(tmp_path / "other", {"ant": 5, "bee": 5}, seed=3)
    set_params(repo, data={"source": str(other)})
    dvc(repo, "repro", "validate")
    switched = json.loads((repo / "metrics/classes.json").read_text())
    if switched != {"source": {"source": str(other), "member": None}, "classes": ["ant", "bee"]}:
        problems.append(f"a new data.source left the accepted list at {switched}")
    tally("classes changed since the last accepted run (dvc repro)", [problems])
