"""extract_archive on well-formed and hostile zip and tar files built in tmp_path."""

from __future__ import annotations

import io
import random
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.sources.archives import (
    ArchiveLimitError,
    ExtractLimits,
    UnsafeArchiveError,
    archive_kind,
    extract_archive,
)

BIG = 1 << 40
TAR_MODES = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz", ".tar.bz2": "w:bz2", ".tar.xz": "w:xz"}
CONTENT = {
    "cats/tabby 1.jpg": b"\xff\xd8 tabby",
    "cats/sub/deep.png": b"\x89PNG deep",
    "dogs/café_日本.jpg": "ünïcødé".encode(),
    "README.txt": b"",
}
LITTER = {"__MACOSX/cats/._tabby 1.jpg": b"apple", "cats/.DS_Store": b"ds", "._README.txt": b"x"}


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def tar_info(name: str, type_: bytes = tarfile.REGTYPE, size: int = 0, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = type_, size
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def files_of(tar_members: dict[str, bytes]) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(tar_info(name, size=len(data)), data) for name, data in tar_members.items()]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_refused(archive: Path, target: Path, error: type[Exception], member: str) -> str:
    """Extraction fails naming the member, leaves no target and nothing beside it."""
    before = sorted(archive.parent.parent.rglob("*"))
    with pytest.raises(error) as info:
        extract_archive(archive, target, max_bytes=BIG, max_files=100)
    message = str(info.value)
    assert repr(member) in message and str(archive) in message
    assert not target.exists()
    assert sorted(archive.parent.parent.rglob("*")) == before
    return message


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """tmp_path/work holds the archives; hostile ones aim at tmp_path beside it."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def test_zip_round_trip_skips_litter(work: Path) -> None:
    archive = make_zip(work / "data.zip", {"cats/": b"", **CONTENT, **LITTER})
    assert archive_kind(archive) == "zip"
    assert extract_archive(archive, work / "out", max_bytes=BIG, max_files=4) == 4
    assert tree(work / "out") == CONTENT
    assert not (work / "out" / "__MACOSX").exists()


@pytest.mark.parametrize("suffix", list(TAR_MODES))
def test_tar_round_trip_skips_litter(work: Path, suffix: str) -> None:
    members = [(tar_info("./", tarfile.DIRTYPE), b""), (tar_info("cats", tarfile.DIRTYPE), b"")]
    members += files_of({**CONTENT, **LITTER})
    archive = make_tar(work / f"data{suffix}", members, TAR_MODES[suffix])
    assert archive_kind(archive) == "tar"
    assert extract_archive(archive, work / "out", max_bytes=BIG, max_files=4) == 4
    assert tree(work / "out") == CONTENT


def test_stored_modes_are_ignored(work: Path) -> None:
    archive = make_tar(work / "suid.tar", [(tar_info("run.sh", size=2, mode=0o6777), b"#!")])
    extract_archive(archive, work / "out", max_bytes=BIG, max_files=10)
    mode = (work / "out" / "run.sh").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IXUSR)


def test_empty_existing_target_is_used_and_emptied_on_error(work: Path) -> None:
    target = work / "out"
    target.mkdir()
    archive = make_tar(work / "bad.tar", files_of({"ok.txt": b"ok", "../evil.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, target, max_bytes=BIG, max_files=10)
    assert target.is_dir() and not any(target.iterdir())


def test_refuses_non_empty_target(work: Path) -> None:
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    archive = make_zip(work / "a.zip", {"a.txt": b"a"})
    with pytest.raises(DataError, match="must be an empty folder"):
        extract_archive(archive, work / "out", max_bytes=BIG, max_files=10)
    assert (work / "out" / "keep.txt").read_text() == "mine"


def test_not_an_archive(work: Path) -> None:
    text = work / "notes.txt"
    text.write_text("hello " * 200)
    assert archive_kind(text) is None
    assert archive_kind(work / "missing.zip") is None
    with pytest.raises(DataError, match="not a zip or tar archive"):
        extract_archive(text, work / "out", max_bytes=BIG, max_files=10)


def test_truncated_archive(work: Path) -> None:
    good = make_tar(work / "good.tar.gz", files_of({"a.bin": bytes(range(256)) * 4000}), "w:gz")
    cut = work / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        extract_archive(cut, work / "out", max_bytes=BIG, max_files=10)
    assert not (work / "out").exists()


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.txt", "'..'"),
        ("ok/../../evil.txt", "'..'"),
        ("..\\evil.txt", "'..'"),
        ("C:/evil.txt", "absolute"),
        ("\\evil.txt", "absolute"),
        ("ABSOLUTE", "absolute"),
    ],
)
def test_refuses_escaping_paths(work: Path, fmt: str, name: str, reason: str) -> None:
    if name == "ABSOLUTE":
        name = str(work.parent / "abs_evil.txt")
    members = {"fine/first.txt": b"written before the bad member", name: b"pwned"}
    if fmt == "zip":
        archive = make_zip(work / "evil.zip", members)
    else:
        archive = make_tar(work / "evil.tar", files_of(members))
    message = assert_refused(archive, work / "out", UnsafeArchiveError, name)
    assert reason in message
    assert not (work.parent / "evil.txt").exists() and not (work.parent / "abs_evil.txt").exists()


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (tar_info("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
        (tar_info("hard", tarfile.LNKTYPE, linkname="/etc/passwd"), "hard link"),
        (tar_info("tty", tarfile.CHRTYPE, devmajor=4, devminor=1), "device"),
        (tar_info("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), "device"),
        (tar_info("pipe", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_refuses_special_tar_members(work: Path, info: tarfile.TarInfo, reason: str) -> None:
    archive = make_tar(work / "special.tar", [*files_of({"a.txt": b"a"}), (info, b"")])
    assert reason in assert_refused(archive, work / "out", UnsafeArchiveError, info.name)


def test_refuses_zip_symlink(work: Path) -> None:
    link = zipfile.ZipInfo("link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(work / "link.zip", "w") as zf:
        zf.writestr("a.txt", b"a")
        zf.writestr(link, "/etc/passwd")
    message = assert_refused(work / "link.zip", work / "out", UnsafeArchiveError, "link")
    assert "symbolic link" in message


def test_refuses_encrypted_zip_member(work: Path) -> None:
    archive = make_zip(work / "secret.zip", {"secret.txt": b"s"})
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")  # zipfile reads the flags from the central directory
    data[central + 8] |= 0x1
    archive.write_bytes(bytes(data))
    message = assert_refused(archive, work / "out", UnsafeArchiveError, "secret.txt")
    assert "encrypted" in message


def test_refuses_duplicate_member(work: Path) -> None:
    archive = make_tar(work / "dup.tar", [*files_of({"a.txt": b"one"}), *files_of({"a.txt": b"2"})])
    assert "duplicate" in assert_refused(archive, work / "out", UnsafeArchiveError, "a.txt")


def test_refuses_path_through_a_file(work: Path) -> None:
    archive = make_tar(work / "through.tar", files_of({"a": b"file", "a/b.txt": b"x"}))
    assert "is a file" in assert_refused(archive, work / "out", UnsafeArchiveError, "a/b.txt")


def test_byte_limit_counts_real_bytes(work: Path) -> None:
    # 2 MB of zeros deflates to a few KB: the archive is small, its content is not.
    archive = make_zip(work / "bomb.zip", {"small.txt": b"ok", "zeros.bin": bytes(2_000_000)})
    assert archive.stat().st_size < 20_000
    with pytest.raises(ArchiveLimitError) as info:
        extract_archive(archive, work / "out", max_bytes=1_000_000, max_files=10)
    message = str(info.value)
    assert "'zeros.bin'" in message and "download.max_extracted_bytes" in message
    assert not (work / "out").exists()


def test_file_count_limit(work: Path) -> None:
    archive = make_zip(work / "many.zip", {f"f{i}.txt": b"x" for i in range(5)})
    with pytest.raises(ArchiveLimitError) as info:
        extract_archive(archive, work / "out", max_bytes=BIG, max_files=3)
    message = str(info.value)
    assert "'f3.txt'" in message and "download.max_files" in message
    assert not (work / "out").exists()
    assert extract_archive(archive, work / "out", max_bytes=BIG, max_files=5) == 5


def test_zip_declaring_too_much_is_refused_before_writing(work: Path) -> None:
    archive = make_zip(work / "big.zip", {"a.txt": b"first", "zeros.bin": bytes(2_000_000)})
    with pytest.raises(ArchiveLimitError, match="declares more than 1000000 bytes.*'zeros.bin'"):
        extract_archive(archive, work / "out", max_bytes=1_000_000, max_files=10)
    assert not (work / "out").exists()


def test_refuses_zip_entries_sharing_data(work: Path) -> None:
    archive = make_zip(work / "one.zip", {"a.txt": b"x" * 1000})
    data = archive.read_bytes()
    cd, end = data.index(b"PK\x01\x02"), data.index(b"PK\x05\x06")
    entry = bytearray(data[cd:end])
    twin = bytes(entry[:46]) + b"b.txt" + bytes(entry[46 + 5 :])  # same offset, other name
    archive.write_bytes(
        data[:cd]
        + bytes(entry)
        + twin
        + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2, 2, 2 * len(entry), cd, 0)
    )
    message = assert_refused(archive, work / "out", UnsafeArchiveError, "b.txt")
    assert "overlaps member 'a.txt'" in message


def test_shared_limits_span_several_archives(work: Path) -> None:
    limits = ExtractLimits(max_bytes=1500, max_files=10)
    archive = make_zip(work / "k.zip", {"k.bin": bytes(1000)})
    assert extract_archive(archive, work / "first", limits=limits) == 1
    with pytest.raises(ArchiveLimitError, match="more than 1500 bytes"):
        extract_archive(archive, work / "second", limits=limits)
    assert (limits.bytes, limits.files) == (1000, 1) and not (work / "second").exists()


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.bz2", ".tar.xz"])
def test_corrupt_compressed_tar(work: Path, suffix: str) -> None:
    """Spoiled past the first members: the decompressor's own error is reported as corrupt."""
    payload = random.Random(0).randbytes(1_000_000)  # bz2 blocks are 900 kB: three here
    members = files_of({f"part{i}.bin": payload for i in range(3)})
    good = make_tar(work / f"good{suffix}", members, TAR_MODES[suffix])
    data = bytearray(good.read_bytes())
    data[-len(data) // 4 :] = bytes(len(data) // 4)
    bad = work / f"bad{suffix}"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt or truncated"):
        extract_archive(bad, work / "out", max_bytes=BIG, max_files=10)
    assert not (work / "out").exists()
