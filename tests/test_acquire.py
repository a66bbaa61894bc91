"""acquire(): mirror (layout and archives), network, failure message, real mirror counts."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import socket
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from knowsam import download as dl
from knowsam.data.acquire import acquire
from knowsam.data.sources import DATASETS, MIRROR_ENV, POLYP, Part, mirror_folder
from knowsam.errors import ConfigError, KnowsamError

# Read before the autouse fixture below clears the variable for the other tests.
REAL_MIRROR = mirror_folder()

# The polyp spec (its renames included) scaled down to a handful of files.
SMALL_POLYP = dataclasses.replace(
    POLYP,
    parts=(
        Part("train", (("TrainDataset/images/*", 3), ("TrainDataset/masks/*", 3))),
        Part("Kvasir", (("TestDataset/Kvasir/images/*", 2), ("TestDataset/Kvasir/masks/*", 2)), optional=True),
        Part("ETIS-LaribPolypDB", (("TestDataset/ETIS-LaribPolypDB/images/*", 1),), optional=True),
    ),
)


@pytest.fixture(autouse=True)
def small_polyp(monkeypatch):
    monkeypatch.setitem(DATASETS, "polyp", SMALL_POLYP)
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)  # retry backoff


def _layout(root: Path, *, train_dirs=("images", "masks"), with_etis=False) -> Path:
    for i in range(3):
        (root / "TrainDataset" / train_dirs[0]).mkdir(parents=True, exist_ok=True)
        (root / "TrainDataset" / train_dirs[0] / f"{i}.jpg").write_bytes(b"img%d" % i)
        (root / "TrainDataset" / train_dirs[1]).mkdir(parents=True, exist_ok=True)
        (root / "TrainDataset" / train_dirs[1] / f"{i}.png").write_bytes(b"mask%d" % i)
    for i in range(2):
        for sub in ("images", "masks"):
            (root / "TestDataset/Kvasir" / sub).mkdir(parents=True, exist_ok=True)
            (root / "TestDataset/Kvasir" / sub / f"k{i}.png").write_bytes(b"k%s%d" % (sub.encode(), i))
    if with_etis:
        (root / "TestDataset/ETIS-LaribPolypDB/images").mkdir(parents=True)
        (root / "TestDataset/ETIS-LaribPolypDB/images/1.tif").write_bytes(b"etis")
    return root


def _manifest(root: Path) -> None:
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]
    (root / "MANIFEST.sha256").write_text("\n".join(lines) + "\n")


def _archives(src: Path, out: Path, wrapper: str = "") -> dict[str, str]:
    """Zip TrainDataset/ and TestDataset/ of ``src`` like the PraNet archives; return their sha256."""
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for top in ("TrainDataset", "TestDataset"):
        path = out / f"{top}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for p in sorted((src / top).rglob("*")):
                if p.is_file():
                    zf.write(p, wrapper + p.relative_to(src).as_posix())
            zf.writestr(f"__MACOSX/{wrapper}{top}/._junk", b"resource fork")
            zf.writestr(f"{wrapper}{top}/._resource.png", b"resource fork")
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _source(root: Path) -> dict:
    return json.loads((root / "SOURCE.json").read_text())


def _leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []


def _serve(folder: Path, requests_seen: list[str]):
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            requests_seen.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


def _with_urls(base: str) -> None:
    DATASETS["polyp"] = dataclasses.replace(
        SMALL_POLYP,
        archives=tuple(dataclasses.replace(a, gdrive_id=None, url=f"{base}/{a.filename}") for a in POLYP.archives),
    )


def test_from_mirror_layout_with_manifest(tmp_path):
    mirror = tmp_path / "mirror"
    _manifest(_layout(mirror / "polyp"))
    root = acquire("polyp", tmp_path / "raw", mirror=mirror, progress=False)
    assert root == tmp_path / "raw" / "polyp"
    assert len(list((root / "TrainDataset/images").iterdir())) == 3
    assert (root / "TestDataset/Kvasir/masks/k1.png").read_bytes() == b"kmasks1"
    source = _source(root)
    assert source["origin"] == "mirror" and source["location"] == str(mirror / "polyp")
    assert source["method"] == "copy"
    assert source["manifest"]["entries_verified"] == 10
    assert source["available"] == ["train", "Kvasir"] and source["unavailable"] == ["ETIS-LaribPolypDB"]
    assert source["counts"]["TrainDataset/masks/*"] == 3
    assert _leftovers(tmp_path / "raw") == ["polyp"]


def test_editing_an_acquired_file_leaves_the_mirror_untouched(tmp_path):
    """Mirror files are copied, never hard-linked: an in-place edit of a raw mask stays in the copy."""
    mirror = tmp_path / "mirror"
    _layout(mirror / "polyp")
    root = acquire("polyp", tmp_path / "raw", mirror=mirror, progress=False)
    raw_mask, mirror_mask = root / "TrainDataset/masks/0.png", mirror / "polyp/TrainDataset/masks/0.png"
    assert raw_mask.stat().st_ino != mirror_mask.stat().st_ino and raw_mask.stat().st_nlink == 1
    with open(raw_mask, "r+b") as fh:  # in place, as an image editor saving over the file does
        fh.write(b"EDITED")
    assert mirror_mask.read_bytes() == b"mask0"


def test_hidden_files_are_not_counted(tmp_path):
    """macOS leaves ._<name> forks and .DS_Store beside copied files."""
    mirror = tmp_path / "mirror"
    _layout(mirror / "polyp")
    masks = mirror / "polyp/TrainDataset/masks"
    (masks / "._0.png").write_bytes(b"\0\5\26\7 resource fork")
    (masks / ".DS_Store").write_bytes(b"Bud1")
    root = acquire("polyp", tmp_path / "raw", mirror=mirror, progress=False)
    assert _source(root)["counts"]["TrainDataset/masks/*"] == 3


def test_mirror_from_environment_variable(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    _layout(mirror / "polyp", with_etis=True)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    root = acquire("polyp", tmp_path / "raw", progress=False)
    assert _source(root)["unavailable"] == [] and "ETIS-LaribPolypDB" in _source(root)["available"]
    assert _source(root)["manifest"] is None


def test_one_rule_finds_the_mirror(tmp_path, monkeypatch):
    """Configured folder first, then the environment variable, else none; ``~`` is the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mirror_folder() is None and mirror_folder("") is None
    monkeypatch.setenv(MIRROR_ENV, "~/from-env")
    assert mirror_folder() == tmp_path / "from-env"
    assert mirror_folder(None) == mirror_folder("") == tmp_path / "from-env"
    assert mirror_folder("~/configured") == tmp_path / "configured"
    assert mirror_folder(tmp_path / "p") == tmp_path / "p"


def test_configured_mirror_wins_over_the_environment(tmp_path, monkeypatch):
    _layout(tmp_path / "mirror/polyp")
    monkeypatch.setenv(MIRROR_ENV, str(tmp_path / "elsewhere"))
    root = acquire("polyp", tmp_path / "raw", mirror=tmp_path / "mirror", progress=False)
    assert _source(root)["location"] == str(tmp_path / "mirror/polyp")


def test_mirror_manifest_mismatch_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    _manifest(_layout(mirror / "polyp"))
    (mirror / "polyp/TrainDataset/images/1.jpg").write_bytes(b"tampered")
    with pytest.raises(KnowsamError) as info:
        acquire("polyp", tmp_path / "raw", mirror=mirror, progress=False)
    assert "TrainDataset/images/1.jpg" in str(info.value) and "MANIFEST.sha256" in str(info.value)
    assert _leftovers(tmp_path / "raw") == []


def test_mirror_with_wrong_counts_is_refused(tmp_path):
    mirror = tmp_path / "mirror"
    _layout(mirror / "polyp")
    (mirror / "polyp/TestDataset/Kvasir/masks/k1.png").unlink()
    with pytest.raises(KnowsamError, match=r"'Kvasir' is incomplete .*masks/\*: expected 2 files, found 1"):
        acquire("polyp", tmp_path / "raw", mirror=mirror, progress=False)
    assert _leftovers(tmp_path / "raw") == []


def test_from_mirror_archives_normalises_folder_names(tmp_path):
    # PraNet's train archive says image/mask; a wrapper folder and __MACOSX are ignored.
    digests = _archives(_layout(tmp_path / "src", train_dirs=("image", "mask")), tmp_path / "mirror/polyp", "PraNet/")
    root = acquire("polyp", tmp_path / "raw", mirror=tmp_path / "mirror", sha256_pins=digests, progress=False)
    assert sorted(p.name for p in (root / "TrainDataset").iterdir()) == ["images", "masks"]
    assert (root / "TrainDataset/images/2.jpg").read_bytes() == b"img2"
    assert not (root / "__MACOSX").exists() and not (root / "PraNet").exists()
    source = _source(root)
    assert {k: v["sha256"] for k, v in source["archives"].items()} == digests
    assert source["available"] == ["train", "Kvasir"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert list(root.rglob("._*")) == []


def test_promise12_archive_is_installed_under_training_data(tmp_path):
    mirror = tmp_path / "mirror" / "promise12"
    mirror.mkdir(parents=True)
    with zipfile.ZipFile(mirror / "training_data.zip", "w") as zf:  # flat, no folder inside
        for case in range(50):
            for suffix in ("", "_segmentation"):
                zf.writestr(f"Case{case:02d}{suffix}.mhd", b"ObjectType = Image\n")
                zf.writestr(f"Case{case:02d}{suffix}.raw", bytes(8))
    root = acquire("promise12", tmp_path / "raw", mirror=tmp_path / "mirror", progress=False)
    assert len(list((root / "training_data").glob("Case??.mhd"))) == 50
    assert (root / "training_data/Case49_segmentation.raw").read_bytes() == bytes(8)
    assert _source(root)["available"] == ["train"]


def test_mirror_archive_with_wrong_pin_is_refused(tmp_path):
    _archives(_layout(tmp_path / "src"), tmp_path / "mirror/polyp")
    with pytest.raises(KnowsamError, match="checksum mismatch for .*TrainDataset.zip"):
        acquire("polyp", tmp_path / "raw", mirror=tmp_path / "mirror", sha256_pins={"TrainDataset.zip": "ab" * 32})
    assert _leftovers(tmp_path / "raw") == []


def test_from_official_url(tmp_path):
    digests = _archives(_layout(tmp_path / "src"), tmp_path / "site")
    seen: list[str] = []
    server = _serve(tmp_path / "site", seen)
    try:
        _with_urls(f"http://127.0.0.1:{server.server_port}")
        root = acquire("polyp", tmp_path / "raw", mirror=tmp_path / "no-mirror", progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["/TrainDataset.zip", "/TestDataset.zip"]
    source = _source(root)
    assert source["origin"] == "download"
    assert {k: v["sha256"] for k, v in source["archives"].items()} == digests
    assert (root / "TestDataset/Kvasir/images/k0.png").read_bytes() == b"kimages0"
    assert _leftovers(tmp_path / "raw") == ["polyp"]  # downloads removed once installed


def test_nothing_available_is_one_line_naming_what_was_tried(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _with_urls(f"http://127.0.0.1:{port}")
    with pytest.raises(KnowsamError) as info:
        acquire("polyp", tmp_path / "raw", mirror=tmp_path / "mirror", progress=False)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code != 0
    assert message.startswith("dataset 'polyp' is not available")
    assert str(tmp_path / "mirror" / "polyp") in message
    assert f"http://127.0.0.1:{port}/TrainDataset.zip" in message
    assert not (tmp_path / "raw" / "polyp").exists()


def test_offline_makes_no_request(tmp_path):
    seen: list[str] = []
    server = _serve(tmp_path, seen)
    try:
        _with_urls(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(KnowsamError, match="offline") as info:
            acquire("polyp", tmp_path / "raw", offline=True, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == []
    assert f"{MIRROR_ENV} unset" in str(info.value) and "/TestDataset.zip" in str(info.value)


def test_acdc_without_mirror_points_to_manual_sources(tmp_path):
    with pytest.raises(KnowsamError) as info:
        acquire("acdc", tmp_path / "raw", mirror=tmp_path / "m", progress=False)
    assert "github.com/HiLab-git/SSL4MIS" in str(info.value) and str(tmp_path / "m" / "acdc") in str(info.value)


def test_existing_copy_is_a_no_op_and_a_broken_one_an_error(tmp_path):
    _layout(tmp_path / "raw" / "polyp")
    root = acquire("polyp", tmp_path / "raw", mirror=tmp_path / "absent", offline=True)
    assert _source(root)["origin"] == "existing" and _source(root)["unavailable"] == ["ETIS-LaribPolypDB"]
    (root / "TrainDataset/images/0.jpg").unlink()
    with pytest.raises(KnowsamError, match="exists but is not a complete 'polyp' dataset"):
        acquire("polyp", tmp_path / "raw", offline=True)
    shutil.rmtree(root / "TrainDataset")  # test sets may be absent, the training split may not
    with pytest.raises(KnowsamError, match=r"part 'train' is missing \(TrainDataset/images/\*"):
        acquire("polyp", tmp_path / "raw", offline=True)


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="known: acdc, demo, polyp, promise12"):
        acquire("kvasir", tmp_path)
    with pytest.raises(ConfigError, match="'Train.zip'.*TrainDataset.zip, TestDataset.zip"):
        acquire("polyp", tmp_path, sha256_pins={"Train.zip": "0" * 64})
    with pytest.raises(ConfigError, match="64 hex"):
        acquire("polyp", tmp_path, sha256_pins={"TrainDataset.zip": "abc"})


def test_archive_without_its_marker_is_refused(tmp_path):
    mirror = tmp_path / "mirror/polyp"
    mirror.mkdir(parents=True)
    for archive in POLYP.archives:
        with zipfile.ZipFile(mirror / archive.filename, "w") as zf:
            zf.writestr("something/else.txt", b"x")
    with pytest.raises(KnowsamError, match="has no 'TrainDataset' entry"):
        acquire("polyp", tmp_path / "raw", mirror=tmp_path / "mirror", progress=False)
    assert _leftovers(tmp_path / "raw") == []


def test_demo_comes_from_its_generator(tmp_path, monkeypatch):
    from knowsam.data import demo

    real = demo.generate_demo
    monkeypatch.setattr(demo, "generate_demo", lambda root: real(root, n_train=3, test_sets={"A": 2}))
    root = acquire("demo", tmp_path / "raw", progress=False)
    source = _source(root)
    assert source["origin"] == "generator"
    assert source["generator_counts"] == {"TrainDataset": 3, "A": 2}
    assert source["counts"]["TrainDataset/masks/*"] == 3 and source["counts"]["TestDataset/*/images/*"] == 2


def test_real_mirror_counts(tmp_path, monkeypatch):
    mirror = REAL_MIRROR
    if mirror is None or not (mirror / "polyp").is_dir() or not (mirror / "acdc").is_dir():
        pytest.skip(f"real data mirror with polyp and acdc not found (set {MIRROR_ENV} to it)")
    monkeypatch.setitem(DATASETS, "polyp", POLYP)
    polyp = acquire("polyp", tmp_path, mirror=mirror, offline=True, progress=False)
    source = _source(polyp)
    counts = source["counts"]
    assert counts["TrainDataset/images/*"] == counts["TrainDataset/masks/*"] == 1450
    tests = {s: counts[f"TestDataset/{s}/images/*"] for s in ("Kvasir", "CVC-ClinicDB", "CVC-ColonDB", "CVC-300")}
    assert tests == {"Kvasir": 100, "CVC-ClinicDB": 62, "CVC-ColonDB": 380, "CVC-300": 60}
    assert source["unavailable"] == ["ETIS-LaribPolypDB"]
    assert source["manifest"]["entries_verified"] == 4104

    acdc = acquire("acdc", tmp_path, mirror=mirror, offline=True, progress=False)
    counts = _source(acdc)["counts"]
    assert counts["data/patient[0-9][0-9][0-9]_frame[0-9][0-9]_slice_*.h5"] == 1312
    assert counts["data/patient[0-9][0-9][0-9]_frame[0-9][0-9].h5"] == 60
    assert (acdc / "train_slices.list").read_text().count("\n") == 1312
