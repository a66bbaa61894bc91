"""Real-dataset readers: ACDC (SSL4MIS h5), PROMISE12 (MetaImage), ETIS-style TIFFs, mirror acceptance.

Small files in each real format are written by the tests; the acceptance tests on the
offline mirror (full polyp and ACDC) are marked slow and skip when the mirror is absent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from PIL import Image

from knowsam.data.acquire import acquire
from knowsam.data.dataset import PreparedDataset
from knowsam.data.frames import find_pairs, prepare_frames, read_image, read_mask, resize_image
from knowsam.data.prepare import prepare_dataset
from knowsam.data.sources import ACDC, POLYP, PROMISE12
from knowsam.data.splits import make_split
from knowsam.data.volumes import PROMISE12_PARTITION, prepare_acdc, prepare_promise12
from knowsam.errors import KnowsamError
from knowsam.evaluate import _score_part
from knowsam.train import validation_arrays
from tests.conftest import mirror_root, small_params

SIZE = 32


# --- ACDC -----------------------------------------------------------------------------


def _acdc_volume(seed: int, shape: tuple[int, int, int], classes: tuple[int, ...] = (1, 2, 3)):
    """A smooth [0, 1] image and a label with the given foreground classes as adjacent blocks."""
    rng = np.random.default_rng(seed)
    d, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([(np.sin(xx / 5 + k) * np.cos(yy / 7) + 1) / 2 for k in range(d)]).astype(np.float32)
    image = np.clip(image + rng.normal(0, 0.01, shape).astype(np.float32), 0, 1)
    label = np.zeros(shape, np.uint8)
    bands = np.array_split(np.arange(w // 4, 3 * w // 4), len(classes))
    for c, cols in zip(classes, bands):
        label[:, h // 4 : 3 * h // 4, cols] = c
    return image, label


def _h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("image", data=image, compression="gzip")
        h5.create_dataset("label", data=label, compression="gzip")


def write_acdc(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SSL4MIS layout: 3 training volumes as 1-based slices, 1 val and 2 test volumes; returns all volumes."""
    (root / "data").mkdir(parents=True)
    volumes = {
        "patient001_frame01": _acdc_volume(0, (3, 40, 36)),
        "patient001_frame12": _acdc_volume(1, (3, 40, 36)),
        "patient002_frame01": _acdc_volume(2, (4, 36, 44), classes=(1, 3)),  # 1 next to 3: no 2 may appear
        "patient003_frame01": _acdc_volume(3, (5, 44, 40)),
        "patient004_frame01": _acdc_volume(4, (2, 40, 40)),
        "patient004_frame09": _acdc_volume(5, (3, 48, 40)),
    }
    train, val, test = list(volumes)[:3], ["patient003_frame01"], ["patient004_frame01", "patient004_frame09"]
    slices = []
    for case in train:
        image, label = volumes[case]
        for k in range(len(image)):
            slices.append(f"{case}_slice_{k + 1}")
            _h5(root / "data" / f"{slices[-1]}.h5", image[k], label[k])
    for case in val + test:
        _h5(root / "data" / f"{case}.h5", *volumes[case])
    for name, items in (("train_slices", slices[::-1]), ("train", train), ("val", val), ("test", test)):
        (root / f"{name}.list").write_text("\n".join(items) + "\n")
    return volumes


@pytest.fixture(scope="module")
def acdc(tmp_path_factory) -> tuple[PreparedDataset, dict]:
    root = tmp_path_factory.mktemp("acdc")
    volumes = write_acdc(root / "raw")
    prepare_acdc(root / "raw", root / "out", ACDC, image_size=SIZE, interpolation="bilinear", workers=1)
    return PreparedDataset(root / "out"), volumes


def test_acdc_counts_cases_and_meta(acdc):
    data, _ = acdc
    assert data.meta["train"] == 10 and data.meta["train_cases"] == 3
    assert data.meta["has_val"] is True and data.meta["val"] == 1 and data.meta["val_slices"] == 5
    assert data.meta["test_sets"] == {"ACDC": 2} and data.eval_parts == ["ACDC"]
    index = data.index("train")
    # Training cases are patients: both frames of patient001 count as one case for the split.
    assert index["case"].value_counts().to_dict() == {"patient001": 6, "patient002": 4}
    assert index["name"].iloc[:3].tolist() == [f"patient001_frame01_slice_{k}" for k in (1, 2, 3)]


def test_acdc_arrays_resized_images_and_nearest_label_ids(acdc):
    data, volumes = acdc
    images, masks = data.images("train"), data.masks()
    assert images.shape == (10, 1, SIZE, SIZE) and images.dtype == np.float16
    assert masks.shape == (10, SIZE, SIZE) and masks.dtype == np.uint8
    image, label = volumes["patient001_frame01"]
    expected = np.asarray(Image.fromarray(image[0]).resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_allclose(images[0, 0].astype(np.float32), expected, atol=1e-3)
    assert set(np.unique(masks[:3])) == {0, 1, 2, 3}
    rows = data.index("train")["case"] == "patient002"
    assert set(np.unique(masks[rows.to_numpy()])) == {0, 1, 3}  # bilinear ids would put a 2 on the 1|3 edge


def test_acdc_eval_parts_keep_original_volumes(acdc):
    data, volumes = acdc
    index = data.index("ACDC")
    assert index["case"].tolist() == ["patient004_frame01"] * 2 + ["patient004_frame09"] * 3
    assert index["slice"].tolist() == [0, 1, 0, 1, 2]
    assert index[["orig_h", "orig_w"]].drop_duplicates().values.tolist() == [[40, 40], [48, 40]]
    assert (index[["spacing_z", "spacing_y", "spacing_x"]] == 1.0).all().all()
    gt = data.ground_truth("ACDC")
    for case in ("patient004_frame01", "patient004_frame09"):
        np.testing.assert_array_equal(gt[case], volumes[case][1])
    assert data.images("ACDC").shape == (5, 1, SIZE, SIZE)
    assert np.load(data.root / "val_masks.npy").shape == (5, SIZE, SIZE)


def test_acdc_validation_split_and_evaluation_contract(acdc):
    """The dataset's own val part feeds validation; evaluation rebuilds each volume at its original size."""
    data, volumes = acdc
    split = make_split(data, 0.5, seed=0, val_fraction=0.2)
    assert split["validation"] == [] and split["counts"]["validation"] == 1
    assert len(split["labeled"]) == 1 and len(split["labeled"] + split["unlabeled"]) == 2  # two patients
    val_images, val_masks, _ = validation_arrays(data, split)
    assert len(val_images) == len(val_masks) == 5
    probs = torch.nn.functional.one_hot(torch.from_numpy(np.array(val_masks)).long(), 4).permute(0, 3, 1, 2).float()
    ((row, key, pred),) = list(_score_part(data, "val", probs, "original"))
    assert key == "val/patient003_frame01" and pred.shape == volumes["patient003_frame01"][1].shape
    assert row["dice"] > 0.9  # only the 44x40 -> 32 -> 44x40 round trip separates them


def test_acdc_fingerprint(acdc):
    data, _ = acdc
    fp = json.loads((data.root / "fingerprint.json").read_text())
    assert fp["train"]["cases"] == 3 and fp["train"]["slices"] == 10
    assert fp["train"]["slice_sizes"] == {"36x40": 6, "44x36": 4}
    assert fp["train"]["cases_with_class"]["myocardium"] == 2
    assert fp["val"]["duplicates_of_train"] == 0 and fp["test_sets"]["ACDC"]["duplicates_of_train"] == 0
    assert fp["test_sets"]["ACDC"]["slices_per_case"] == {"min": 2.0, "median": 2.5, "max": 3.0}
    assert fp["problems"] == [] and fp["spacing_unit"].startswith("voxel")
    label_total = sum(fp["train"]["label_voxels"].values())
    assert label_total == 3 * 40 * 36 * 2 + 4 * 36 * 44


def test_acdc_soft_problems_reach_the_fingerprint(tmp_path):
    volumes = write_acdc(tmp_path / "raw")
    (tmp_path / "raw/val.list").write_text("patient001_frame12\n")  # a training patient, and a training volume
    _h5(tmp_path / "raw/data/patient001_frame12.h5", *volumes["patient001_frame12"])
    prepare_acdc(tmp_path / "raw", tmp_path / "out", ACDC, image_size=SIZE, interpolation="bilinear", workers=1)
    problems = json.loads((tmp_path / "out/fingerprint.json").read_text())["problems"]
    assert "patient(s) in both train and val: patient001" in problems
    assert sum(p.startswith("cross-set duplicate: val/patient001_frame12 slice") for p in problems) == 3


def _break(root: Path, what: str) -> Path:
    """Damage one file of an ACDC copy; return the file the error must name."""
    culprit = root / "data" / "patient001_frame12_slice_2.h5"
    with h5py.File(culprit, "r") as h5:
        image, label = h5["image"][()], h5["label"][()]
    if what == "label value":
        label[0, 0] = 7
    elif what == "shape":
        label = label[:-1]
    elif what == "nan":
        image[3, 3] = np.nan
    elif what == "range":
        image = image * 300
    elif what == "two channels":
        image, label = np.stack([image, image], axis=-1), np.stack([label, label], axis=-1)
    if what == "garbage":
        culprit.write_bytes(b"not an h5 file")
    elif what == "group":
        with h5py.File(culprit, "w") as h5:
            h5.create_group("image").create_dataset("data", data=image)
            h5.create_dataset("label", data=label)
    elif what == "missing":
        culprit.unlink()
    else:
        _h5(culprit, image, label)
    return culprit


@pytest.mark.parametrize(
    "what,message",
    [
        ("label value", "label values [7] outside 0..3"),
        ("shape", "differs from image shape"),
        ("nan", "NaN/inf voxel"),
        ("range", "expected the SSL4MIS normalisation"),
        ("garbage", "unreadable h5 file"),
        ("missing", "file not found"),
        ("group", "'image' in this h5 file is a group, not an array"),
        ("two channels", "expected a 2D training slice, got image shape (40, 36, 2)"),
    ],
)
def test_acdc_bad_files_are_named_in_one_line(tmp_path, what, message):
    write_acdc(tmp_path / "raw")
    culprit = _break(tmp_path / "raw", what)
    with pytest.raises(KnowsamError) as err:
        prepare_acdc(tmp_path / "raw", tmp_path / "out", ACDC, image_size=SIZE, interpolation="bilinear", workers=1)
    text = str(err.value)
    assert text.startswith(str(culprit)) and message in text and "\n" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # nothing half-prepared left behind


def test_acdc_slices_with_a_channel_axis_prepare_as_plain_slices(tmp_path, acdc):
    """(H, W, 1) slices (image and label) are squeezed: the same arrays as (H, W), not H slices of W x 1."""
    write_acdc(tmp_path / "raw")
    for path in (tmp_path / "raw/data").glob("*_slice_*.h5"):
        with h5py.File(path, "r") as h5:
            image, label = h5["image"][()], h5["label"][()]
        _h5(path, image[..., None], label[..., None])
    prepare_acdc(tmp_path / "raw", tmp_path / "out", ACDC, image_size=SIZE, interpolation="bilinear", workers=1)
    data, _ = acdc
    assert PreparedDataset(tmp_path / "out").meta["train"] == data.meta["train"] == 10
    for name in ("train_images.npy", "train_masks.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / name), np.load(data.root / name))


def test_acdc_list_errors_name_the_list(tmp_path):
    write_acdc(tmp_path / "raw")
    (tmp_path / "raw/test.list").write_text("patient004_frame01\npatient004_frame01\n")
    with pytest.raises(KnowsamError, match=r"test\.list: lists 'patient004_frame01' more than once"):
        prepare_acdc(tmp_path / "raw", tmp_path / "out", ACDC, image_size=SIZE, interpolation="bilinear", workers=1)


# --- PROMISE12 ------------------------------------------------------------------------

SPACING_ZYX = (3.6, 0.6, 0.5)  # y and x differ so that an axis swap shows
SMALL_PARTITION = {"train": (0, 1, 2), "val": (3,), "test": (4,)}


def _mhd(path: Path, array: np.ndarray, spacing_zyx=SPACING_ZYX) -> None:
    volume = sitk.GetImageFromArray(array)
    volume.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(volume, str(path))


def write_promise12(root: Path, numbers) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CaseNN.mhd/.raw (int16 MR-like intensities with one hot outlier) + CaseNN_segmentation.mhd/.raw."""
    folder = root / "training_data"
    folder.mkdir(parents=True)
    cases = {}
    for n in numbers:
        d, h, w = 4 + n % 3, 24, 20
        zz, yy, xx = np.mgrid[:d, :h, :w]
        rng = np.random.default_rng(n)
        image = (200 + 4 * yy + 3 * xx + rng.normal(0, 5, (d, h, w))).astype(np.int16)
        image[0, 0, 0] = 30000  # one bright artefact: min-max scaling would squash everything else to ~0
        label = (((yy - 12) / 6) ** 2 + ((xx - 9) / 5) ** 2 < 1).astype(np.uint8)
        label[0] = 0
        _mhd(folder / f"Case{n:02d}.mhd", image)
        _mhd(folder / f"Case{n:02d}_segmentation.mhd", label)
        cases[f"Case{n:02d}"] = (image, label)
    return cases


@pytest.fixture(scope="module")
def promise12(tmp_path_factory) -> tuple[PreparedDataset, dict]:
    root = tmp_path_factory.mktemp("promise12")
    cases = write_promise12(root / "raw", range(5))
    prepare_promise12(
        root / "raw",
        root / "out",
        PROMISE12,
        image_size=SIZE,
        interpolation="bilinear",
        workers=1,
        partition=SMALL_PARTITION,
    )
    return PreparedDataset(root / "out"), cases


def test_promise12_parts_spacing_and_axis_order(promise12):
    data, cases = promise12
    assert data.meta["test_sets"] == {"PROMISE12": 1} and data.meta["val"] == 1 and data.meta["has_val"]
    assert data.meta["train"] == 4 + 5 + 6 and data.meta["train_cases"] == 3
    index = data.index("PROMISE12")
    assert index["case"].unique().tolist() == ["Case04"] and index["slice"].tolist() == [0, 1, 2, 3, 4]
    first = index.iloc[0]
    assert (first.orig_h, first.orig_w) == (24, 20)
    assert (first.spacing_z, first.spacing_y, first.spacing_x) == pytest.approx(SPACING_ZYX)
    np.testing.assert_array_equal(data.ground_truth("PROMISE12")["Case04"], cases["Case04"][1])
    np.testing.assert_array_equal(data.ground_truth("val")["Case03"], cases["Case03"][1])


def test_promise12_percentile_normalisation(promise12):
    data, cases = promise12
    image = np.asarray(data.images("train")[:4, 0], dtype=np.float32)  # Case00
    assert image.min() == 0.0 and image.max() == 1.0
    assert 0.2 < float(np.median(image)) < 0.8  # the 30000 outlier did not squash the volume
    raw = cases["Case00"][0].astype(np.float32)
    lo, hi = np.percentile(raw, (0.5, 99.5))
    scaled = Image.fromarray(np.clip((raw[1] - lo) / (hi - lo), 0, 1))
    expected = np.asarray(scaled.resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_allclose(image[1], expected, atol=1e-3)


def test_promise12_fingerprint(promise12):
    data, _ = promise12
    fp = json.loads((data.root / "fingerprint.json").read_text())
    assert fp["train"]["spacing"]["z"] == {"min": 3.6, "median": 3.6, "max": 3.6}
    assert fp["train"]["spacing"]["x"]["median"] == pytest.approx(0.5)
    assert fp["train"]["slice_sizes"] == {"20x24": 15} and fp["spacing_unit"].startswith("mm")
    assert fp["train"]["cases_with_class"] == {"background": 3, "prostate": 3}
    assert fp["problems"] == []


def test_promise12_default_protocol_through_prepare_dataset(tmp_path):
    """All 50 cases, the fixed 35/5/10 partition, and the fingerprint copied to reports."""
    write_promise12(tmp_path / "data/raw/promise12", range(50))
    meta = prepare_dataset("promise12", small_params(tmp_path).data, reports_root=tmp_path / "reports")
    assert (meta["train_cases"], meta["val"], meta["test_sets"]) == (35, 5, {"PROMISE12": 10})
    assert PROMISE12_PARTITION["test"] == tuple(range(40, 50))
    index = PreparedDataset(tmp_path / "data/prepared/promise12").index("train")
    assert index["case"].iloc[-1] == "Case34"
    assert json.loads((tmp_path / "reports/promise12.json").read_text())["test_sets"]["PROMISE12"]["cases"] == 10


def test_promise12_errors_name_the_file(tmp_path):
    write_promise12(tmp_path / "raw", range(5))
    (tmp_path / "raw/training_data/Case03.raw").unlink()
    run = dict(image_size=SIZE, interpolation="bilinear", workers=1, partition=SMALL_PARTITION)
    with pytest.raises(KnowsamError, match=r"Case03\.mhd: unreadable MetaImage \(its data file .*Case03\.raw is"):
        prepare_promise12(tmp_path / "raw", tmp_path / "out", PROMISE12, **run)
    _mhd(tmp_path / "raw/training_data/Case03.mhd", np.zeros((4, 24, 20), np.int16) + np.arange(20, dtype=np.int16))
    _mhd(tmp_path / "raw/training_data/Case01_segmentation.mhd", np.full((5, 24, 20), 2, np.uint8))
    with pytest.raises(KnowsamError, match=r"Case01_segmentation\.mhd: label values \[2\] outside 0\.\.1"):
        prepare_promise12(tmp_path / "raw", tmp_path / "out", PROMISE12, **run)
    _mhd(tmp_path / "raw/training_data/Case01_segmentation.mhd", np.zeros((5, 24, 20), np.uint8), (3.0, 0.6, 0.5))
    with pytest.raises(KnowsamError, match=r"Case01_segmentation\.mhd: spacing"):
        prepare_promise12(tmp_path / "raw", tmp_path / "out", PROMISE12, **run)
    assert not (tmp_path / "out").exists()


# --- ETIS-style TIFFs -----------------------------------------------------------------


def _rgb(seed: int, h: int = 30, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_tiff_frames_by_sample_layout_not_colour_tag(tmp_path):
    rgb = _rgb(0)
    tifffile.imwrite(tmp_path / "grey_tagged.tif", rgb, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "planar.tif", rgb.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(tmp_path / "sixteen.tif", rgb.astype(np.uint16) * 257, photometric="rgb")
    Image.fromarray(rgb).save(tmp_path / "lzw.tif", compression="tiff_lzw")  # tifffile needs an extra codec here
    for name in ("grey_tagged", "planar", "sixteen", "lzw"):
        np.testing.assert_array_equal(read_image(tmp_path / f"{name}.tif"), rgb, err_msg=name)
    tifffile.imwrite(tmp_path / "mask.tif", np.array([[0, 1], [1, 0]], bool))
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.tif"), [[0, 1], [1, 0]])
    tifffile.imwrite(tmp_path / "mask16.tif", np.array([[0, 1], [1, 0]], np.uint16))  # {0, 1}, not its top 8 bits
    np.testing.assert_array_equal(read_mask(tmp_path / "mask16.tif"), [[0, 1], [1, 0]])
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(KnowsamError, match=r"broken\.tif: unreadable"):
        read_image(tmp_path / "broken.tif")


def _pair_folder(folder: Path, frames: dict[str, np.ndarray], mask_names: dict[str, str]) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    for stem, rgb in frames.items():
        tifffile.imwrite(folder / "images" / f"{stem}.tif", rgb, photometric="minisblack", planarconfig="contig")
        mask = np.zeros(rgb.shape[:2], np.uint8)
        mask[5:20, 8:25] = 255
        tifffile.imwrite(folder / "masks" / f"{mask_names[stem]}.tif", mask)


def test_etis_names_and_grey_tagged_tiffs_prepare(tmp_path):
    raw = tmp_path / "raw"
    _pair_folder(raw / "TrainDataset", {"a": _rgb(1), "b": _rgb(2)}, {"a": "a", "b": "b"})
    frames = {"1": _rgb(3), "2": _rgb(4), "10": _rgb(5)}
    _pair_folder(raw / "TestDataset/ETIS-LaribPolypDB", frames, {"1": "p1", "2": "p2", "10": "p10"})
    meta = prepare_frames(
        raw,
        tmp_path / "out",
        POLYP,
        image_size=SIZE,
        interpolation="bilinear",
        test_sets=["ETIS-LaribPolypDB"],
        workers=1,
    )
    assert meta["test_sets"] == {"ETIS-LaribPolypDB": 3}
    data = PreparedDataset(tmp_path / "out")
    assert data.index("ETIS-LaribPolypDB")["name"].tolist() == ["1", "2", "10"]
    np.testing.assert_array_equal(data.images("ETIS-LaribPolypDB")[2], resize_image(frames["10"], SIZE, "bilinear"))
    assert data.ground_truth("ETIS-LaribPolypDB")["1"].sum() == 15 * 17


def test_exact_mask_stem_wins_and_missing_masks_are_named(tmp_path):
    folder = tmp_path / "TestDataset/ETIS-LaribPolypDB"
    _pair_folder(folder, {"1": _rgb(1), "p1": _rgb(2)}, {"1": "p1", "p1": "1"})
    assert [(s, m.stem) for s, _, m in find_pairs(folder / "images", folder / "masks")] == [("1", "1"), ("p1", "p1")]
    tifffile.imwrite(folder / "images/7.tif", _rgb(3))
    with pytest.raises(KnowsamError, match=r"images/7\.tif: no mask named 7 or p7 .*\(1 frame\(s\) without a mask\)"):
        find_pairs(folder / "images", folder / "masks")


# --- specs and readers ------------------------------------------------------------------


def test_every_spec_names_a_reader_and_a_case_rule():
    from knowsam.data.prepare import READERS
    from knowsam.data.sources import CASE_RULES, DATASETS, KINDS

    for spec in DATASETS.values():
        assert spec.reader in READERS and spec.case_rule in CASE_RULES and spec.kind in KINDS


def test_case_rules():
    from knowsam.data.sources import DEMO

    assert ACDC.case_of("patient007_frame12") == "patient007"
    assert PROMISE12.case_of("Case07") == "Case07" and DEMO.case_of("frame_3") == "frame_3"
    with pytest.raises(KnowsamError, match=r"^'Case07' is not an ACDC volume name patientNNN_frameNN$"):
        ACDC.case_of("Case07")


def test_spec_with_unknown_rule_or_wrong_class_names_is_refused():
    with pytest.raises(ValueError, match="case_rule 'slice' is not one of frame, volume, patient"):
        dataclasses.replace(PROMISE12, case_rule="slice")
    with pytest.raises(ValueError, match="kind 'volume-mri' is not one of 2d, 3d"):
        dataclasses.replace(PROMISE12, kind="volume-mri")
    with pytest.raises(ValueError, match="1 class names for 2 classes"):
        dataclasses.replace(PROMISE12, class_names=("prostate",))


def test_meta_takes_classes_and_case_rule_from_the_spec(tmp_path):
    raw = tmp_path / "raw"
    _pair_folder(raw / "TrainDataset", {"a": _rgb(1), "b": _rgb(2)}, {"a": "a", "b": "b"})
    spec = dataclasses.replace(POLYP, name="lesion", class_names=("background", "lesion"))
    meta = prepare_frames(
        raw, tmp_path / "out", spec, image_size=SIZE, interpolation="bilinear", test_sets=[], workers=1
    )
    assert (meta["dataset"], meta["kind"], meta["in_channels"]) == ("lesion", "2d", 3)
    assert meta["class_names"] == ["background", "lesion"]
    grey = dataclasses.replace(spec, in_channels=1)
    with pytest.raises(
        KnowsamError,
        match=r"^dataset 'lesion': the frames reader reads 2D RGB frames with binary "
        r"masks, not kind 2d with 1 channel\(s\) and 2 classes$",
    ):
        prepare_frames(raw, tmp_path / "grey", grey, image_size=SIZE, interpolation="bilinear", test_sets=[])


def test_volume_cases_follow_the_spec_rule(tmp_path):
    """The same ACDC files grouped by volume instead of patient: each volume is its own training case."""
    write_acdc(tmp_path / "raw")
    by_volume = dataclasses.replace(ACDC, case_rule="volume")
    prepare_acdc(tmp_path / "raw", tmp_path / "out", by_volume, image_size=SIZE, interpolation="bilinear", workers=1)
    cases = PreparedDataset(tmp_path / "out").index("train")["case"].unique().tolist()
    assert cases == ["patient001_frame01", "patient001_frame12", "patient002_frame01"]


# --- acceptance on the offline mirror ---------------------------------------------------

needs_mirror = pytest.mark.skipif(mirror_root() is None, reason="offline data mirror not found (set KNOWSAM_MIRROR)")


@pytest.mark.slow
@needs_mirror
def test_mirror_polyp_counts_and_no_cross_set_duplicates(tmp_path):
    acquire("polyp", tmp_path / "data/raw", mirror=mirror_root(), progress=False)
    params = small_params(tmp_path)
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, image_size=SIZE))
    meta = prepare_dataset("polyp", params.data, reports_root=tmp_path / "reports")
    assert meta["train"] == 1450
    assert meta["test_sets"] == {"Kvasir": 100, "CVC-ClinicDB": 62, "CVC-ColonDB": 380, "CVC-300": 60}
    assert meta["unavailable"] == ["ETIS-LaribPolypDB"]
    fp = json.loads((tmp_path / "reports/polyp.json").read_text())
    assert all(s["duplicates_of_train"] == 0 for s in fp["test_sets"].values())
    assert not [p for p in fp["problems"] if p.startswith("cross-set duplicate")]


@pytest.mark.slow
@needs_mirror
def test_mirror_acdc_counts(tmp_path):
    acquire("acdc", tmp_path / "data/raw", mirror=mirror_root(), progress=False)
    meta = prepare_dataset("acdc", small_params(tmp_path).data, reports_root=tmp_path / "reports")
    assert (meta["train"], meta["train_cases"], meta["val"], meta["test_sets"]) == (1312, 140, 20, {"ACDC": 40})
    fp = json.loads((tmp_path / "reports/acdc.json").read_text())
    assert fp["problems"] == [] and fp["val"]["cases"] == 20 and fp["test_sets"]["ACDC"]["slices"] == 380
    data = PreparedDataset(tmp_path / "data/prepared/acdc")
    assert np.load(data.root / "val_masks.npy", mmap_mode="r").shape == (fp["val"]["slices"], SIZE, SIZE)
    assert data.ground_truth("ACDC")["patient011_frame01"].ndim == 3
