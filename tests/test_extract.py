"""safe_extract: good archives come out whole, hostile or damaged ones leave nothing."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from knowsam.data.extract import safe_extract
from knowsam.errors import KnowsamError

FILES = {
    "TrainDataset/images/1.png": b"\x89PNG" + bytes(3000),
    "TrainDataset/masks/1.png": b"mask" * 100,
    "README": b"hi",
}
TAR_MODES = [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")]


def _zip(path: Path, entries: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # unix, so the mode bits below are meaningful
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _tar(path: Path, entries: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(archive: Path, dest: Path, *fragments: str) -> str:
    """Extraction must fail with one line naming the archive, and leave nothing behind."""
    before = sorted(p.name for p in dest.parent.iterdir())
    with pytest.raises(KnowsamError) as info:
        safe_extract(archive, dest)
    message = str(info.value)
    assert "\n" not in message
    assert str(archive) in message
    for fragment in fragments:
        assert fragment in message
    assert not dest.exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == before  # no temporary folder left
    return message


def test_good_zip(tmp_path):
    archive = _zip(tmp_path / "a.zip", FILES)
    out = safe_extract(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in out) == sorted(FILES)
    assert _tree(tmp_path / "out") == FILES


@pytest.mark.parametrize("mode,suffix", TAR_MODES)
def test_good_tars(tmp_path, mode, suffix):
    archive = _tar(tmp_path / f"a{suffix}", FILES, mode)
    out = safe_extract(archive, tmp_path / "out")
    assert len(out) == 3
    assert _tree(tmp_path / "out") == FILES


def test_empty_existing_destination_is_filled_but_a_full_one_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", FILES)
    (tmp_path / "out").mkdir()
    safe_extract(archive, tmp_path / "out")
    assert _tree(tmp_path / "out") == FILES
    with pytest.raises(KnowsamError, match="not empty"):
        safe_extract(archive, tmp_path / "out")
    assert _tree(tmp_path / "out") == FILES


@pytest.mark.parametrize("name", ["../evil", "ok/../../evil", "..\\evil"])
def test_zip_with_parent_components_is_refused(tmp_path, name):
    archive = _zip(tmp_path / "bad.zip", {"fine.txt": b"x", name: b"evil"})
    _refused(archive, tmp_path / "out", repr(name), "..")
    assert not (tmp_path / "evil").exists()


def test_tar_with_parent_component_after_good_members_is_refused(tmp_path):
    archive = _tar(tmp_path / "bad.tar.gz", {"a/fine.txt": b"x", "a/../../evil": b"evil"})
    _refused(archive, tmp_path / "out", "'a/../../evil'")
    assert not (tmp_path / "evil").exists()


def test_absolute_paths_are_refused(tmp_path):
    target = tmp_path / "abs_evil"
    _refused(_zip(tmp_path / "abs.zip", {str(target): b"evil"}), tmp_path / "out", "absolute")
    _refused(_tar(tmp_path / "abs.tar", {str(target): b"evil"}, "w"), tmp_path / "out", "absolute")
    _refused(_zip(tmp_path / "drive.zip", {"C:/Windows/evil": b"evil"}), tmp_path / "out", "absolute")
    assert not target.exists()


def test_symlinks_are_refused(tmp_path):
    link = tarfile.TarInfo("data/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../outside"
    _refused(_tar(tmp_path / "sym.tar.gz", {"data/a": b"1"}, extra=[link]), tmp_path / "out", "'data/link'", "link")
    archive = _zip(tmp_path / "sym.zip", {"a": b"1"}, symlinks={"data/link": "/etc/passwd"})
    _refused(archive, tmp_path / "out", "'data/link'", "symbolic link")


def test_hardlinks_and_devices_are_refused(tmp_path):
    hard = tarfile.TarInfo("hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "a"
    _refused(_tar(tmp_path / "hard.tar", {"a": b"1"}, "w", [hard]), tmp_path / "out", "'hard'", "link")
    device = tarfile.TarInfo("dev/null")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    _refused(_tar(tmp_path / "dev.tar", {}, "w", [device]), tmp_path / "out", "'dev/null'", "special file")
    fifo = tarfile.TarInfo("pipe")
    fifo.type = tarfile.FIFOTYPE
    _refused(_tar(tmp_path / "fifo.tar.xz", {}, "w:xz", [fifo]), tmp_path / "out", "'pipe'", "special file")


def test_truncated_zip_is_refused(tmp_path):
    good = _zip(tmp_path / "good.zip", FILES).read_bytes()
    archive = tmp_path / "cut.zip"
    archive.write_bytes(good[: len(good) // 2])
    _refused(archive, tmp_path / "out", "corrupt or truncated")


def test_zip_with_damaged_data_is_refused(tmp_path):
    data = bytearray(_zip(tmp_path / "good.zip", {"x.bin": bytes(range(256)) * 64}).read_bytes())
    data[60] ^= 0xFF  # inside the compressed data of the only member
    archive = tmp_path / "damaged.zip"
    archive.write_bytes(bytes(data))
    _refused(archive, tmp_path / "out", "'x.bin'", "corrupt")


@pytest.mark.parametrize("mode,suffix", TAR_MODES[1:])
def test_truncated_compressed_tar_is_refused(tmp_path, mode, suffix):
    payload = {f"f{i}.bin": bytes([i]) * 5000 for i in range(20)}
    good = _tar(tmp_path / f"good{suffix}", payload, mode).read_bytes()
    archive = tmp_path / f"cut{suffix}"
    archive.write_bytes(good[: len(good) - 40])
    _refused(archive, tmp_path / "out", "truncated")


def test_plain_tar_cut_at_a_member_boundary_is_refused(tmp_path):
    good = _tar(tmp_path / "good.tar", {"a": bytes(512), "b": b"b" * 512}, "w").read_bytes()
    archive = tmp_path / "cut.tar"
    archive.write_bytes(good[: 4 * 512])  # two headers + two data blocks: no end-of-archive block
    _refused(archive, tmp_path / "out", "end-of-archive", "truncated")


def test_not_an_archive_is_refused(tmp_path):
    archive = tmp_path / "notes.zip"
    archive.write_bytes(b"<html>quota exceeded</html>" * 40)
    _refused(archive, tmp_path / "out", "not a readable zip or tar archive")
