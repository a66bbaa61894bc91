"""Params validation: every kind of bad value is one line naming the key, exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from knowsam import config
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
    for name in config.profile_names():
        params = config.load(config.profile_path(name))
        assert params.profile == name


def test_repo_params_is_the_demo_profile():
    assert (REPO / "params.yaml").read_text() == (REPO / "knowsam/profiles/demo.yaml").read_text()


@pytest.mark.parametrize("path,value,message", [
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
    ("method_params", {"labeled-only": {"x": 1}}, "unknown key 'method_params.labeled-only.x'"),
])
def test_bad_params_name_the_key(path, value, message):
    with pytest.raises(ConfigError) as err:
        config.validate(config.parse(_with(path, value)))
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_float_accepts_int():
    params = config.parse(_with("train.lr", 1))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_cli_reports_bad_params_in_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_with("ratios", [2.0])))
    proc = subprocess.run([sys.executable, "-m", "knowsam", "split", "demo", "--params", str(bad)],
                          capture_output=True, text=True, cwd=tmp_path)
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


def test_validating_params_does_not_import_torch():
    # acquire, prepare and split validate every method name but never train: no torch import for them.
    code = ("import sys; from knowsam import config; "
            f"config.load({str(REPO / 'knowsam/profiles/paper.yaml')!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
