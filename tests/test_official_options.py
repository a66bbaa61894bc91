"""Official behaviours kept as options: UCMT's model selection and unlabeled pool, KnowSAM's strong
random affine (albumentations 1.x's ``alpha_affine``) and its schedules in absolute iterations."""

from __future__ import annotations

import dataclasses
import math

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from knowsam.data.augment import _REFLECT, WeakStrongAugment
from knowsam.data.dataset import PreparedDataset
from knowsam.data.geometry import ViewGeometry, warp_from_albumentations
from knowsam.data.splits import read_split, split_path, write_split
from knowsam.data.three_point_affine import ThreePointAffine, anchor_points
from knowsam.errors import ConfigError
from knowsam.methods.knowsam import consistency_weight
from knowsam.methods.params import iterations_of
from knowsam.methods.registry import method_params
from knowsam.runs import RunId
from knowsam.train import train_run
from tests.conftest import REPO, small_params
from tests.test_catalogue import cli, one_line, params_dict, write_params  # noqa: F401 (cli is a fixture)
from tests.test_knowsam import batch, make

UCMT = RunId("ucmt", "demo", 0.1, 0)


# --- UCMT: the official model selection --------------------------------------------------------


@pytest.fixture(scope="module")
def ucmt_workspace(demo_prepared):
    params = small_params(demo_prepared)
    data = PreparedDataset(demo_prepared / "data/prepared/demo")
    write_split(data, split_path(params.data.splits_root, "demo", 0.1, 0), 0.1, 0, 0.1)
    return demo_prepared


def _train_ucmt(workspace, runs_root, select: str, **train):
    params = small_params(workspace, **{"iterations": 8, "eval_every": 2, "checkpoint_every": 8, **train})
    params = dataclasses.replace(params, method_params={"ucmt": {"select": select}})
    return train_run(params, UCMT, runs_root=runs_root, progress=False)


def _logged(runs_root, part: str, term: str) -> pd.Series:
    """A dvclive curve at full precision, indexed by iteration (1-based)."""
    table = pd.read_csv(UCMT.live_dir(runs_root) / "plots/metrics" / part / f"{term}.tsv", sep="\t")
    return pd.Series(table[term].to_numpy(), index=table["step"].to_numpy() + 1)


def test_ucmt_train_loss_selection_keeps_the_lowest_window_mean_of_the_mixed_update(ucmt_workspace, tmp_path):
    """Official train.py:350-358: the teacher of the epoch whose mean loss of the second (mixed)
    update is lowest (`<=`: the later on a tie); here an epoch is the eval_every-iteration window."""
    summary = _train_ucmt(ucmt_workspace, tmp_path / "loss", "train-loss")
    loss_mix = _logged(tmp_path / "loss", "train", "loss_mix")
    assert loss_mix.index.tolist() == list(range(1, 9))
    means = {end: loss_mix.loc[end - 1 : end].mean() for end in (2, 4, 6, 8)}
    lowest = min(means.values())
    expected = max(end for end, m in means.items() if m == lowest)
    assert summary["best_step"] == expected
    run_dir = UCMT.train_dir(tmp_path / "loss")
    kept = torch.load(run_dir / "best.pt", weights_only=True)
    assert kept["step"] == expected
    val = _logged(tmp_path / "loss", "val", "dice")
    assert summary["best_val_dice"] == pytest.approx(val.loc[expected])  # reported, not used to select

    # The default keeps the best validation Dice: on these numbers another iteration, so the rule matters.
    by_dice = _train_ucmt(ucmt_workspace, tmp_path / "dice", "val-dice")
    val = _logged(tmp_path / "dice", "val", "dice")
    assert by_dice["best_step"] == val.index[val.to_numpy().argmax()]
    assert by_dice["best_step"] != expected


def test_ucmt_train_loss_selection_resumes_its_window(ucmt_workspace, tmp_path):
    """A checkpoint inside a selection window (step 5 of the window 5-6) keeps the window's partial sum."""
    full = _train_ucmt(ucmt_workspace, tmp_path / "full", "train-loss", checkpoint_every=5)
    _train_ucmt(ucmt_workspace, tmp_path / "resumed", "train-loss", checkpoint_every=5)
    run_dir = UCMT.train_dir(tmp_path / "resumed")
    state = torch.load(run_dir / "checkpoint.prev.pt", weights_only=True)
    loss_mix = _logged(tmp_path / "full", "train", "loss_mix")
    assert state["step"] == 5 and state["selection_window"] == [pytest.approx(loss_mix.loc[5], rel=1e-12), 1]
    (run_dir / "checkpoint.pt").unlink()  # stopped before the step-8 checkpoint: resume from step 5
    resumed = _train_ucmt(ucmt_workspace, tmp_path / "resumed", "train-loss", checkpoint_every=5)
    assert resumed["best_step"] == full["best_step"]
    last = [
        torch.load(UCMT.train_dir(root) / "checkpoint.pt", weights_only=True)["best"]
        for root in (tmp_path / "full", tmp_path / "resumed")
    ]
    assert last[0] == last[1]  # the same window means: the same scores
    a = torch.load(UCMT.train_dir(tmp_path / "full") / "best.pt", weights_only=True)["weights"]["teacher"]
    b = torch.load(run_dir / "best.pt", weights_only=True)["weights"]["teacher"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- UCMT: the unlabeled pool --------------------------------------------------------------------


def test_ucmt_unlabeled_rows_come_from_every_training_image_unless_told_otherwise(ucmt_workspace, monkeypatch):
    """Official train.py:71: the unlabeled loader iterates the whole training set, labeled images included."""
    from knowsam.data import loader
    from knowsam.runs import build_method

    params = small_params(ucmt_workspace)
    data = PreparedDataset(ucmt_workspace / "data/prepared/demo")
    split = read_split(split_path(params.data.splits_root, "demo", 0.1, 0), data)
    index = data.index("train")
    rows = {
        name: set(np.flatnonzero(index["case"].isin(set(split[name])).to_numpy()))
        for name in ("labeled", "unlabeled", "validation")
    }
    for pool, expected in (("all", rows["labeled"] | rows["unlabeled"]), ("unlabeled", rows["unlabeled"])):
        run_params = dataclasses.replace(params, method_params={"ucmt": {"unlabeled_pool": pool}})
        method = build_method(run_params, UCMT, data, torch.device("cpu"))
        stream = loader.TrainStream(
            data,
            split,
            label_pool=method.label_pool,
            uses_unlabeled=True,
            batch_size=4,
            labeled_batch=2,
            seed=0,
            device=torch.device("cpu"),
            unlabeled_pool=method.unlabeled_pool,
        )
        drawn = set(stream.unlabeled.take(len(expected)).tolist())  # one epoch: every row once
        assert drawn == expected and not drawn & rows["validation"]
        assert set(stream.labeled.take(len(rows["labeled"])).tolist()) == rows["labeled"]
    assert method_params("ucmt", {}).unlabeled_pool == "all"

    class Built(Exception):
        pass

    def built(self, *args, **kwargs):
        raise Built(kwargs["unlabeled_pool"])

    monkeypatch.setattr(loader.TrainStream, "__init__", built)
    with pytest.raises(Built, match="^all$"):  # the training loop hands the method's pool to its stream
        train_run(params, UCMT, runs_root=ucmt_workspace / "unused", progress=False)


# --- KnowSAM: the strong random affine ---------------------------------------------------------


def _affines(n: int, size: int, alpha: float, seed: int = 0) -> np.ndarray:
    """``n`` matrices (n, 3, 3) drawn by the transform, as albumentations applies it."""
    pipeline = A.Compose([ThreePointAffine(alpha_affine=alpha)], save_applied_params=True)
    pipeline.set_random_seed(seed)
    image = np.zeros((size, size), np.float32)
    return np.stack([pipeline(image=image)["applied_transforms"][0][1]["matrix"] for _ in range(n)])


def test_three_point_affine_moves_the_anchor_points_uniformly_by_up_to_alpha():
    """albumentations 1.3.1 (functional.py, elastic_transform): the points centre + (s, s), (s, -s),
    (-s, -s), s = size // 3, each move by uniform(-alpha, alpha) in x and y, independently."""
    size, alpha = 256, 50.0
    source = np.array([[213, 213], [213, 43], [43, 43]], np.float64)  # 128 +- 85
    np.testing.assert_array_equal(anchor_points(size, size), source)
    m = _affines(4000, size, alpha)
    moved = np.einsum("nij,kj->nki", m[:, :2, :2], source) + m[:, None, :2, 2]
    shift = (moved - source).reshape(-1)  # 6 numbers per draw
    assert -alpha <= shift.min() and shift.max() <= alpha
    assert stats.kstest(shift, stats.uniform(-alpha, 2 * alpha).cdf).pvalue > 0.01
    per_draw = (moved - source).reshape(len(m), 6)
    assert np.abs(np.corrcoef(per_draw.T) - np.eye(6)).max() < 0.06  # independent coordinates

    # The image corners move by the barycentric mix of the anchor shifts: std alpha / sqrt(3) x |weights|.
    for corner in ((0, 0), (255, 0), (0, 255), (255, 255)):
        weights = np.linalg.solve(np.vstack([source.T, np.ones(3)]), [*corner, 1.0])
        got = np.einsum("nij,j->ni", m[:, :2, :2], corner) + m[:, :2, 2] - corner
        assert got.std(0) == pytest.approx([alpha / math.sqrt(3) * np.linalg.norm(weights)] * 2, rel=0.05)


def test_three_point_affine_moves_image_content_by_its_matrix():
    """Dots at the anchor points land where the recorded matrix sends them; masks follow (nearest)."""
    size = 256
    image = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.uint8)
    for x, y in anchor_points(size, size).astype(int):
        image[y - 2 : y + 3, x - 2 : x + 3] = 1.0
        mask[y - 2 : y + 3, x - 2 : x + 3] = 1
    pipeline = A.Compose([ThreePointAffine(alpha_affine=50, border_mode=_REFLECT)], save_applied_params=True)
    for seed in range(5):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=mask)
        matrix = out["applied_transforms"][0][1]["matrix"]
        for point in anchor_points(size, size):
            tx, ty = matrix[:2, :2] @ point + matrix[:2, 2]
            if not (8 <= tx <= size - 9 and 8 <= ty <= size - 9):  # moved out of the image
                continue
            x0, y0 = int(round(tx)), int(round(ty))
            window = out["image"][y0 - 6 : y0 + 7, x0 - 6 : x0 + 7]
            ys, xs = np.mgrid[y0 - 6 : y0 + 7, x0 - 6 : x0 + 7]
            centre = (np.sum(xs * window) / window.sum(), np.sum(ys * window) / window.sum())
            assert centre == pytest.approx((tx, ty), abs=0.3)
            assert out["mask"][y0, x0] == 1
        assert set(np.unique(out["mask"])) <= {0, 1}


def test_strong_pipeline_draws_the_affine_on_a_quarter_of_the_unlabeled_images():
    """Official transforms.py:56-59: OneOf(grid distortion, elastic with alpha_affine 50), p 0.5."""
    aug = WeakStrongAugment(64)
    aug.strong.set_random_seed(0)
    names = [
        [n for n, _ in aug.strong(image=np.zeros((64, 64, 3), np.float32))["applied_transforms"]] for _ in range(1000)
    ]
    affine = np.array(["ThreePointAffine" in n for n in names])
    assert 0.21 < affine.mean() < 0.29
    assert all(n[n.index("ThreePointAffine") + 1] == "ElasticTransform" for n in names if "ThreePointAffine" in n)
    assert not any("ThreePointAffine" in n and "GridDistortion" in n for n in names)
    alpha = [t for t in aug.strong.transforms[4].transforms[1].transforms if isinstance(t, ThreePointAffine)]
    assert alpha[0].alpha_affine == 50 * 64 / 256  # the official 50 px at 256 px, relative to the image elsewhere


@pytest.mark.parametrize("seed", range(6))
def test_teacher_maps_follow_the_strong_affine_both_ways(seed: int):
    """The recorded geometry moves the clean image onto the view, and the view's maps back onto the
    image exactly where the view shows it, however strong the affine. The image is each pixel's own
    coordinates, which bilinear resampling keeps exact away from the borders: errors are in pixels."""
    size = 128
    ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    x0 = torch.from_numpy(np.stack([xs, ys, np.full_like(xs, size // 2)]).astype(np.float32))[None]
    shift_scale_rotate = A.Affine(
        translate_percent=(-0.0625, 0.0625), scale=(0.95, 1.05), rotate=(-10, 10), border_mode=_REFLECT, p=1.0
    )
    elastic = A.Sequential(
        [
            ThreePointAffine(alpha_affine=25, border_mode=_REFLECT),
            A.ElasticTransform(alpha=1, sigma=50, border_mode=_REFLECT, p=1.0),
        ],
        p=1.0,
    )
    pipeline = A.Compose([A.HorizontalFlip(p=1.0), shift_scale_rotate, elastic], save_applied_params=True)
    pipeline.set_random_seed(seed)
    out = pipeline(image=x0[0].permute(1, 2, 0).numpy())
    view = torch.from_numpy(out["image"]).permute(2, 0, 1)[None]
    hflip, vflip, warp, unwarp = warp_from_albumentations(out["applied_transforms"], size)
    geometry = ViewGeometry(
        torch.tensor([hflip]),
        torch.tensor([vflip]),
        torch.zeros(1, dtype=torch.int64),
        torch.from_numpy(warp)[None],
        torch.from_numpy(unwarp)[None],
    )
    assert (geometry.apply(x0) - view).abs().mean() < 0.01

    # Pixels of the (flipped) image that stay 2 px inside the image through both affine steps.
    first, second = (
        np.asarray(p["matrix"]) for n, p in out["applied_transforms"] if n in ("Affine", "ThreePointAffine")
    )
    points = np.stack([xs, ys, np.ones_like(xs)], -1).astype(np.float64)
    stages = (points, points @ first.T, points @ (second @ first).T)
    shown = np.logical_and.reduce([((s[..., :2] > 2) & (s[..., :2] < size - 3)).all(-1) for s in stages])
    back = geometry.invert(view)[0].permute(1, 2, 0)
    assert shown.mean() > 0.3
    assert (back - x0[0].permute(1, 2, 0))[torch.from_numpy(shown).flip(-1)].abs().max() < 0.01


# --- KnowSAM: schedules in iterations or fractions -----------------------------------------------


def test_iterations_are_fractions_up_to_one_and_absolute_above():
    assert [iterations_of(v, 1000) for v in (0.0, 0.24, 1.0, 1.5e3, 12000.0)] == [0, 240, 1000, 1500, 12000]


def test_paper_profile_mixes_and_ramps_at_the_official_iterations_whatever_the_run_length():
    """Official trainer.py:183, 188 with max_iterations 50000: w(t) = 0.1 x 10 x sigmoid_rampup(t // 250,
    200), mixing at iter_num > 12000. The paper profile writes both in iterations; fractions of a 50k
    run give the same steps, fractions of a shorter run shrink them."""
    import yaml

    paper = yaml.safe_load((REPO / "knowsam/profiles/paper.yaml").read_text())["method_params"]["knowsam"]
    assert paper == {"mixed_iterations": 12000, "consistency_ramp_iterations": 50000}

    def official(t: int) -> float:
        return 1.0 * math.exp(-5 * (1 - min(t // int(50000 / 200), 200) / 200) ** 2)

    absolute = make(iterations=1000, **{k: float(v) for k, v in paper.items()})
    fractions = make(iterations=50000)
    short = make(iterations=1000)
    assert (absolute.mix_after, fractions.mix_after, short.mix_after) == (12000, 12000, 240)
    assert not absolute.mixing_at(999) and fractions.mixing_at(12001) and not fractions.mixing_at(12000)
    for t in (0, 249, 250, 999):
        assert consistency_weight(t, absolute.ramp_span, 1.0, 200) == pytest.approx(official(t), rel=1e-6)
    for t in (0, 249, 250, 12345, 49999):
        assert consistency_weight(t, fractions.ramp_span, 1.0, 200) == pytest.approx(official(t), rel=1e-6)
    assert consistency_weight(5, short.ramp_span, 1.0, 200) == pytest.approx(official(5 * 50), rel=1e-6)
    # The weight the step uses is the one these give.
    terms = absolute.losses(batch(2, 2), 250)
    assert terms["cons_weight"].item() == pytest.approx(official(250), rel=1e-6)


# --- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, key, value, message",
    [
        ("ucmt", "select", "best", "ucmt: select must be one of val-dice, train-loss, got 'best'"),
        ("ucmt+skd", "unlabeled_pool", "labeled", "ucmt: unlabeled_pool must be one of unlabeled, all, got 'labeled'"),
        (
            "knowsam",
            "mixed_iterations",
            12000.5,
            "knowsam: mixed_iterations must be a fraction of train.iterations in "
            "[0, 1] or a whole number of iterations above 1, got 12000.5",
        ),
        ("knowsam", "mixed_iterations", -1, "knowsam: mixed_iterations must be a fraction"),
        ("knowsam", "kd_weight", -0.5, "knowsam: kd_weight must be >= 0, got -0.5"),
        ("knowsam", "self_training_weight", -1, "knowsam: self_training_weight must be >= 0, got -1"),
        ("knowsam", "consistency_ramp_iterations", 2.5, "knowsam: consistency_ramp_iterations must be a fraction"),
        (
            "knowsam",
            "consistency_ramp_iterations",
            math.inf,
            "params: 'method_params.knowsam.consistency_ramp_iterations' must be a finite number, got inf",
        ),
        (
            "knowsam",
            "consistency_ramp_iterations",
            math.nan,
            "params: 'method_params.knowsam.consistency_ramp_iterations' must be a finite number, got nan",
        ),
    ],
)
def test_bad_option_values_are_refused_naming_the_key(method, key, value, message):
    with pytest.raises(ConfigError) as err:
        method_params(method, {key: value})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_option_value_on_the_command_line(tmp_path, cli):  # noqa: F811
    ws = tmp_path / "ws"
    write_params(ws, params_dict(method_params={"ucmt": {"select": "best"}}))
    one_line(*cli(ws, "split", "demo"), 2, r"^error: ucmt: select must be one of val-dice, train-loss, got 'best'$")
    assert not (ws / "data").exists()
