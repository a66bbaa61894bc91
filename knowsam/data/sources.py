"""The dataset registry: every fact about where a dataset comes from and what it holds.

Acquisition (``knowsam.data.acquire``), preparation (``knowsam.data.prepare``), loaders
and reports all read these specs, so a URL, a count, a class list or the rule that
groups images into cases is written down exactly once. ``mirror_folder`` is the one
rule that finds the offline mirror.

Canonical layouts (relative to ``<raw_root>/<dataset>/``) are the ``files`` globs of
each spec's parts. Notes per dataset:

* ``polyp``: PraNet protocol. The PraNet archives name the training folders
  ``TrainDataset/image`` and ``TrainDataset/mask``; acquisition renames them to
  ``images``/``masks`` so training and test sets share one layout (``renames``).
  Test sets are optional parts: a source lacking one (the offline mirror has no
  ETIS-LaribPolypDB) yields the others, with the missing one recorded as unavailable.
* ``promise12``: the Zenodo ``training_data.zip`` unpacks to ``training_data/CaseNN*``;
  the canonical layout keeps that folder.
* ``acdc``: the SSL4MIS preprocessing (h5 slices and volumes plus split lists). The
  SSL4MIS repository (``data/ACDC``) holds only the split lists; its README points to a
  password-protected BaiduDisk archive for the h5 files, which no script can fetch.
  So acdc has no automatic download: a mirror folder (see ``acquire``) is the
  practical route, and ``manual_sources`` tells the user where to get the files.
* ``demo``: synthetic, written by ``knowsam.data.demo.generate_demo``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from knowsam.errors import ConfigError, KnowsamError

MIRROR_ENV = "KNOWSAM_MIRROR"

# "2d": image/mask frames scored per frame; "3d": volumes trained slice by slice and scored per volume.
KINDS = ("2d", "3d")


def mirror_folder(configured: str | Path | None = None) -> Path | None:
    """The offline mirror: ``configured`` (``data.mirror``, a ``--mirror`` option), else ``$KNOWSAM_MIRROR``.

    None where neither names a folder; whether the folder exists is for the caller to judge.
    """
    chosen = configured or os.environ.get(MIRROR_ENV)
    return Path(chosen).expanduser() if chosen else None


_ACDC_PATIENT = re.compile(r"(patient\d{3})_frame\d{2}")


def _patient(volume: str) -> str:
    match = _ACDC_PATIENT.fullmatch(volume)
    if not match:
        raise KnowsamError(f"{volume!r} is not an ACDC volume name patientNNN_frameNN")
    return match.group(1)


# How a training frame or volume name maps to its case, the unit that splits keep on one side.
CASE_RULES: dict[str, Callable[[str], str]] = {
    "frame": lambda name: name,  # every 2D frame is its own case
    "volume": lambda name: name,  # every volume is its own case (all its slices together)
    # ACDC has two volumes per patient (end-diastole and end-systole frames); SSL4MIS counts
    # patients, so both volumes of a patient land on the same side of a split.
    "patient": _patient,
}


@dataclass(frozen=True)
class Archive:
    """One official download.

    ``marker`` names an entry (file or folder) that sits at the archive's content root,
    wherever that root is inside the archive (archives often wrap it in extra folders);
    the root's children are installed under ``install_to`` in the dataset folder.
    """

    filename: str  # saved under this name; also the name looked for in a mirror folder
    marker: str
    install_to: str = ""
    url: str | None = None
    gdrive_id: str | None = None
    sha256: str | None = None  # pinned digest; None where the publisher gives none
    size: str = ""  # approximate, for people reading messages

    def __post_init__(self) -> None:
        if (self.url is None) == (self.gdrive_id is None):
            raise ValueError(f"archive {self.filename!r} needs exactly one of url and gdrive_id")

    @property
    def source(self) -> str:
        """A URL a person can open, for messages and provenance records."""
        if self.url:
            return self.url
        return f"https://drive.google.com/uc?id={self.gdrive_id}"


@dataclass(frozen=True)
class Part:
    """A unit of a dataset that is either complete or absent (a split, a test set).

    ``files`` pairs a glob relative to the dataset folder with the number of files it must
    match; ``None`` means "at least one" (sizes chosen by a generator). An optional part
    may be absent ("unavailable") without failing the dataset; a part that is present
    with the wrong counts always fails, since that means damaged data.
    """

    name: str
    files: tuple[tuple[str, int | None], ...]
    optional: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the harness knows about one dataset before it is on disk."""

    name: str
    kind: str  # one of KINDS
    num_classes: int
    class_names: tuple[str, ...]  # one per class id, background first
    in_channels: int
    reader: str  # a key of knowsam.data.prepare.READERS: the preparer for the raw format
    case_rule: str  # a key of CASE_RULES
    parts: tuple[Part, ...]
    archives: tuple[Archive, ...] = ()
    manual_sources: tuple[str, ...] = ()  # where a person gets data that no script can fetch
    renames: tuple[tuple[str, str], ...] = ()  # (found, canonical) folder pairs, applied after extraction
    generator: str | None = None  # "module:function" writing the dataset, for synthetic data
    licence: str = ""
    citation: str = ""

    def __post_init__(self) -> None:
        for field, value, known in (("kind", self.kind, KINDS), ("case_rule", self.case_rule, tuple(CASE_RULES))):
            if value not in known:
                raise ValueError(f"dataset {self.name!r}: {field} {value!r} is not one of {', '.join(known)}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"dataset {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    def case_of(self, name: str) -> str:
        """The case a training frame or volume belongs to, by the dataset's ``case_rule``."""
        return CASE_RULES[self.case_rule](name)

    @property
    def top_level(self) -> tuple[str, ...]:
        """First path components of the required layout: what marks an extracted copy."""
        names = {glob.split("/", 1)[0] for p in self.parts if not p.optional for glob, _ in p.files}
        return tuple(sorted(names))


def _pairs(prefix: str, count: int) -> tuple[tuple[str, int], ...]:
    return ((f"{prefix}/images/*", count), (f"{prefix}/masks/*", count))


POLYP_TEST_SETS: dict[str, int] = {
    "Kvasir": 100,
    "CVC-ClinicDB": 62,
    "CVC-ColonDB": 380,
    "ETIS-LaribPolypDB": 196,
    "CVC-300": 60,
}

_POLYP_DIRS = ("TrainDataset", *(f"TestDataset/{s}" for s in POLYP_TEST_SETS))

POLYP = DatasetSpec(
    name="polyp",
    kind="2d",
    num_classes=2,
    class_names=("background", "polyp"),
    in_channels=3,
    reader="frames",
    case_rule="frame",
    parts=(
        # 1450 = 900 Kvasir-SEG + 550 CVC-ClinicDB frames (PraNet's training split).
        Part("train", _pairs("TrainDataset", 1450)),
        *(Part(s, _pairs(f"TestDataset/{s}", n), optional=True) for s, n in POLYP_TEST_SETS.items()),
    ),
    archives=(
        # Google Drive ids from the PraNet README; no checksums are published for them.
        Archive("TrainDataset.zip", "TrainDataset", gdrive_id="1YiGHLw4iTvKdvbT6MgwO9zcCv8zJ_Bnb", size="~400 MB"),
        Archive("TestDataset.zip", "TestDataset", gdrive_id="1Y2z7FD5p5y31vkZwQQomXFRB0HutHyao", size="~327 MB"),
    ),
    renames=tuple(
        (f"{d}/{old}", f"{d}/{new}") for d in _POLYP_DIRS for old, new in (("image", "images"), ("mask", "masks"))
    ),
    licence="research and education only, under each source dataset's terms; no commercial use",
    citation=(
        "Fan et al., PraNet, MICCAI 2020 (split); Jha et al., Kvasir-SEG, MMM 2020; "
        "Bernal et al., CVC-ClinicDB, CMIG 2015; Bernal et al., CVC-ColonDB, Pattern Recognition 2012; "
        "Silva et al., ETIS-LaribPolypDB, IJCARS 2014; Vazquez et al., EndoScene (CVC-300), J. Healthcare Eng. 2017"
    ),
)

_CASE = "training_data/Case[0-9][0-9]"

PROMISE12 = DatasetSpec(
    name="promise12",
    kind="3d",
    num_classes=2,
    class_names=("background", "prostate"),
    in_channels=1,
    reader="promise12-mhd",
    case_rule="volume",
    parts=(
        Part(
            "train",
            (
                (f"{_CASE}.mhd", 50),
                (f"{_CASE}.raw", 50),
                (f"{_CASE}_segmentation.mhd", 50),
                (f"{_CASE}_segmentation.raw", 50),
            ),
        ),
    ),
    archives=(
        Archive(
            "training_data.zip",
            marker="Case00.mhd",
            install_to="training_data",
            url="https://zenodo.org/records/8026660/files/training_data.zip?download=1",
            size="~324 MB",
        ),
    ),
    licence="research use under the terms stated on Zenodo record 8026660",
    citation="Litjens et al., Evaluation of prostate segmentation algorithms for MRI: the PROMISE12 challenge, "
    "Medical Image Analysis 18(2), 2014",
)

_PATIENT = "data/patient[0-9][0-9][0-9]_frame[0-9][0-9]"

ACDC = DatasetSpec(
    name="acdc",
    kind="3d",
    num_classes=4,
    class_names=("background", "right ventricle", "myocardium", "left ventricle"),
    in_channels=1,
    reader="ssl4mis-h5",
    case_rule="patient",
    parts=(
        Part("train_slices", ((f"{_PATIENT}_slice_*.h5", 1312),)),
        Part("volumes", ((f"{_PATIENT}.h5", 60),)),  # 20 validation + 40 test volumes
        Part("lists", tuple((name, 1) for name in ("train_slices.list", "train.list", "val.list", "test.list"))),
    ),
    manual_sources=(
        "https://github.com/HiLab-git/SSL4MIS/tree/master/data/ACDC",
        "https://pan.baidu.com/s/1d0cFhj3LU029oHajNni8KQ",
    ),
    licence="research use under the ACDC challenge terms (https://www.creatis.insa-lyon.fr/Challenge/acdc/)",
    citation="Bernard et al., IEEE TMI 37(11), 2018; preprocessing from SSL4MIS (github.com/HiLab-git/SSL4MIS)",
)

DEMO = DatasetSpec(
    name="demo",
    kind="2d",
    num_classes=2,
    class_names=("background", "polyp"),
    in_channels=3,
    reader="frames",
    case_rule="frame",
    # Sizes are generator arguments, so only "non-empty" is checked here; SOURCE.json
    # records the counts the generator reported.
    parts=(
        Part("train", (("TrainDataset/images/*", None), ("TrainDataset/masks/*", None))),
        Part("test", (("TestDataset/*/images/*", None), ("TestDataset/*/masks/*", None))),
    ),
    generator="knowsam.data.demo:generate_demo",
    licence="synthetic, no patient data",
    citation="knowsam-bench synthetic demo dataset",
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (POLYP, PROMISE12, ACDC, DEMO)}


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
