"""Params validation: every kind of bad value is one line naming the key, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from knowsam import config, validation
from knowsam.errors import ConfigError
from tests.conftest import REPO

DEMO = yaml.safe_load((REPO / "knowsam/profiles/demo.yaml").read_text())


def _with(path: str, value):
    raw = yaml.safe_load(yaml.safe_dump(DEMO))
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value
    return raw


def test_every_profile_validates():
    # The profiles are the lists of methods; params.yaml is whichever one the user chose.
    assert {"demo", "cpu", "paper"} <= set(config.profile_names())
    for name in config.profile_names():
        params = validation.load(config.profile_path(name))
        assert params.profile == name


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("train.iterationz", 5, "unknown key 'train.iterationz'"),
        ("train.iterations", "many", "'train.iterations' must be int"),
        ("train.iterations", True, "'train.iterations' must be int"),
        ("sam.normalize_pixels", 1, "'sam.normalize_pixels' must be bool"),
        ("ratios", [0.0], "'ratios[0]' = 0.0 must be in (0, 1]"),
        ("ratios", [1.5], "'ratios[0]' = 1.5 must be in (0, 1]"),
        ("seeds", [], "'seeds' is empty"),
        ("methods", ["nope"], "'methods[0]' unknown method 'nope'"),
        ("datasets", ["mnist"], "'datasets[0]' unknown dataset 'mnist'"),
        ("data.image_size", 100, "'data.image_size' = 100 must be a positive multiple of 16"),
        ("train.labeled_batch", 9, "'train.labeled_batch' = 9 must be in [1, train.batch_size = 8]"),
        ("data.interpolation", "cubic", "'data.interpolation' must be one of bilinear, nearest"),
        ("sam.decoder", "lite", "'sam.decoder' must be one of adapted, stock"),
        ("method_params", {"labeled-only": {"x": 1}}, "unknown key 'method_params.labeled-only.x' (known: none)"),
        ("method_params", {"nope": {}}, "'method_params.nope' names an unknown method"),
        ("method_params", {"mt": {"ema_decay": "high"}}, "'method_params.mt.ema_decay' must be float, got 'high'"),
        ("method_params", {"ucmt": {"umix_topk": True}}, "'method_params.ucmt.umix_topk' must be int, got True"),
        ("method_params", {"mt+skd": {"kd_tau": 4.0}}, "unknown key 'method_params.mt+skd.kd_tau'"),
        ("method_params", {"knowsam": {"kd_entropy_form": "x"}}, "knowsam: kd_entropy_form must be one of"),
    ],
)
def test_bad_params_name_the_key(path, value, message):
    with pytest.raises(ConfigError) as err:
        validation.validate(config.parse(_with(path, value)))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_float_accepts_int():
    params = config.parse(_with("train.lr", 1))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_cli_reports_bad_params_in_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_with("ratios", [2.0])))
    proc = subprocess.run(
        [sys.executable, "-m", "knowsam", "split", "demo", "--params", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params: 'ratios[0]' = 2.0 must be in (0, 1]"


def test_method_index_matches_the_registered_methods():
    from knowsam.methods import get_method, registry

    get_method("mt")  # imports every method module
    registered = list(registry._METHODS)
    for suffix in registry._PLUGINS:
        registered += [f"{n}+{suffix}" for n, cls in registry._METHODS.items() if suffix in cls.accepts_plugins]
    assert sorted(registry.method_names()) == sorted(registered)
    for name, module in registry.METHOD_INDEX.items():
        base, _, suffix = name.partition("+")
        defined_in = registry._PLUGINS[suffix].__module__ if suffix else registry._METHODS[base].__module__
        assert defined_in == f"knowsam.methods.{module}", name
    assert registry.UPPER_BOUNDS == {n for n in registry.method_names() if registry.get_method(n).label_pool == "all"}
    from knowsam.methods import params  # every declared Params belongs to a registered method or plug-in

    assert set(params._BASE) <= set(registry._METHODS) and set(params._PLUGIN) <= set(registry._PLUGINS)


def test_float_and_int_method_params_are_coerced_like_the_rest():
    from knowsam.methods.registry import method_params

    assert method_params("mt", {"consistency": 1}).consistency == 1.0
    assert isinstance(method_params("mt", {"consistency": 1}).consistency, float)


def test_validating_params_does_not_import_torch(tmp_path):
    # acquire, prepare and split validate every method and its params but never train: no torch import for them.
    raw = yaml.safe_load((REPO / "knowsam/profiles/paper.yaml").read_text())
    raw["method_params"] = {
        "mt": {"consistency": 0.2},
        "ucmt+skd": {"umix_topk": 3, "kd_weight": 0.5},
        "knowsam": {"kd_entropy_form": "official-2class", "mix_patches": 4},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = (
        "import sys; from knowsam import validation; "
        f"p = validation.load({str(path)!r}); print(len(p.method_params), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3 False"
