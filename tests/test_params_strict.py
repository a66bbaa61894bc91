"""Params are read as DVC reads them and every value is checked before anything runs.

YAML 1.2 through ruamel.yaml, DVC's own parser: ``3e-2`` is a float, a duplicate key at any level is
refused with its line; a scalar where a list belongs, and a numeric value that torch would refuse or
that would compute nonsense (a negative momentum, thread count or loss weight, an EMA decay above 1),
is one line naming the key, exit 2, before any stage writes anything.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml

from knowsam import config, validation
from knowsam.errors import ConfigError
from knowsam.methods.params import params_class
from knowsam.methods.registry import method_names
from tests.test_catalogue import cli, one_line, params_dict, write_params  # noqa: F401 (cli is a fixture)

PARAMS_TEXT = yaml.safe_dump(params_dict())


def refused(tmp_path, cli, raw: dict | str, pattern: str) -> str:
    ws = tmp_path / "ws"
    write_params(ws, raw)
    line = one_line(*cli(ws, "split", "demo"), 2, pattern)
    assert not (ws / "data").exists()
    return line


# --- values: every numeric parameter has a range -------------------------------------------------

CASES = {
    "ratios as a scalar": (dict(ratios=0.1), r"params: 'ratios' must be a list, got float"),
    "negative momentum": (dict(train={"momentum": -3}), r"params: 'train.momentum' = -3.0 must be in \[0, 1\)"),
    "momentum of 1": (dict(train={"momentum": 1.0}), r"params: 'train.momentum' = 1.0 must be in \[0, 1\)"),
    "negative threads": (dict(train={"threads": -3}), r"params: 'train.threads' = -3 must be >= 0"),
    "negative weight decay": (dict(train={"weight_decay": -0.1}), r"params: 'train.weight_decay' = -0.1 must be >= 0"),
    "negative overlay count": (dict(eval={"overlay_images": -1}), r"params: 'eval.overlay_images' = -1 must be >= 0"),
    "infinite lr": (dict(train={"lr": float("inf")}), r"params: 'train.lr' must be a finite number, got inf"),
    "nan loss weight": (
        dict(method_params={"knowsam": {"entropy_weight": float("nan")}}),
        r"params: 'method_params.knowsam.entropy_weight' must be a finite number, got nan",
    ),
    "unknown SAM arch": (dict(sam={"arch": "vit_q"}), r"params: 'sam.arch' must be one of vit_b, .*, got 'vit_q'"),
    "EMA decay above 1": (
        dict(method_params={"mt": {"ema_decay": 1.5}}),
        r"mt: ema_decay must be in \[0, 1\], got 1.5",
    ),
    "negative noise": (dict(method_params={"mt": {"noise_std": -0.1}}), r"mt: noise_std must be >= 0, got -0.1"),
    "negative CPS weight": (dict(method_params={"cps": {"cps_weight": -1}}), r"cps: cps_weight must be >= 0"),
    "UCMT share above 1": (dict(method_params={"ucmt": {"student1_share": 2}}), r"ucmt: student1_share must be in"),
    "UCMT patch of 0 px": (dict(method_params={"ucmt": {"umix_min_patch": 0}}), r"ucmt: umix_min_patch must be > 0"),
    "negative KD weight": (dict(method_params={"mt+skd": {"kd_weight": -1}}), r"skd: kd_weight must be >= 0"),
    "plug-in keeps its base's checks": (
        dict(method_params={"ucmt+skd": {"ema_decay": -0.5}}),
        r"ucmt: ema_decay must be in \[0, 1\]",
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.replace(" ", "-"))
def test_bad_value_is_one_line_before_anything_runs(tmp_path, cli, case):
    overrides, pattern = CASES[case]
    refused(tmp_path, cli, params_dict(**overrides), r"^error: " + pattern)


def numeric_fields() -> list[tuple[str, type, str, dict]]:
    """(section key, class, field, raw params holding it) for every int/float field of every params class."""
    found = []
    for section, cls in (("data", config.DataParams), ("train", config.TrainParams), ("eval", config.EvalParams)):
        found += [(section, cls, f.name, {section: {}}) for f in dataclasses.fields(cls)]
    for name in method_names():
        cls = params_class(name)
        found += [
            (f"method_params.{name}", cls, f.name, {"method_params": {name: {}}}) for f in dataclasses.fields(cls)
        ]
    return [(key, cls, name, raw) for key, cls, name, raw in found if typing.get_type_hints(cls)[name] in (int, float)]


def test_every_numeric_parameter_refuses_a_negative_value():
    """-1 is nonsense for every number in the schema (counts, sizes, rates, weights, decays): each is
    refused by the checks that run before any stage, never first by torch."""
    fields = numeric_fields()
    assert len(fields) > 40  # the walk found the schema's fields
    accepted = []
    for key, _cls, name, _sections in fields:
        raw = params_dict()
        if key.startswith("method_params."):
            raw["method_params"] = {key.split(".", 1)[1]: {name: -1}}
        else:
            raw[key] = {**raw[key], name: -1}
        try:
            validation.validate(config.parse(raw))
        except ConfigError as exc:
            assert "\n" not in str(exc) and name in str(exc), str(exc)
        else:
            accepted.append(f"{key}.{name}")
    assert accepted == []


def test_sam_arch_list_is_the_teacher_registry():
    from knowsam.models.sam_teacher import TEACHER_ARCHS

    assert config.SAM_ARCHS == TEACHER_ARCHS


# --- the file: YAML 1.2 as DVC reads it ---------------------------------------------------------


def test_floats_in_exponent_form_are_read_as_dvc_reads_them(tmp_path):
    from dvc.utils.serialize import parse_yaml

    text = PARAMS_TEXT.replace("lr: 0.03", "lr: 3e-2").replace("weight_decay: 0.0001", "weight_decay: 1E-4")
    assert "lr: 3e-2" in text and "weight_decay: 1E-4" in text
    path = write_params(tmp_path, text)
    params = validation.load(path)
    assert (params.train.lr, params.train.weight_decay) == (0.03, 0.0001)
    dvc = parse_yaml(text, str(path))
    assert (dvc["train"]["lr"], dvc["train"]["weight_decay"]) == (0.03, 0.0001)
    assert config.load_yaml(path) == dvc  # one reading of the file, the harness's and DVC's


def test_yaml_1_1_only_forms_are_not_numbers_or_booleans(tmp_path, cli):
    """`yes` is a string in YAML 1.2 (and to DVC): refused for a boolean instead of read as true."""
    text = PARAMS_TEXT.replace("amp_bf16: false", "amp_bf16: yes")
    refused(tmp_path, cli, text, r"^error: params: 'train.amp_bf16' must be bool, got 'yes'$")


@pytest.mark.parametrize(
    "text, key, row",
    [
        (PARAMS_TEXT.replace("  lr: 0.03\n", "  lr: 0.03\n  lr: 0.01\n"), "train.lr", "  lr: "),
        (PARAMS_TEXT + "train:\n  lr: 0.1\n", "train", "train:"),
        (PARAMS_TEXT + "seeds: [1]\n", "seeds", "seeds:"),
    ],
    ids=["nested key", "whole section", "top-level list"],
)
def test_duplicate_keys_are_refused_like_dvc(tmp_path, cli, text, key, row):
    """A hand-run command would otherwise take the last value, and a repeated section would drop the first."""
    from dvc.utils.serialize import YAMLFileCorruptedError, parse_yaml

    first_line, dup_line = [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith(row)][:2]
    refused(
        tmp_path,
        cli,
        text,
        rf"^error: \S*params.yaml: duplicate key '{key}' at line {dup_line} "
        rf"\(first at line {first_line}\); keep one",
    )
    with pytest.raises(YAMLFileCorruptedError):  # DVC refuses the same file
        parse_yaml(text, "params.yaml")


def test_yaml_syntax_error_names_its_line(tmp_path, cli):
    refused(tmp_path, cli, "datasets: [demo\nmethods: x\n", r"^error: \S*params.yaml: not valid YAML \(.* at line 2\)$")


# --- no validation images: a stated rule, not "best validation Dice nan" --------------------------


def test_val_fraction_zero_reports_the_final_weights(tmp_path, monkeypatch, capsys, demo_prepared):
    import torch

    from knowsam.cli import main

    ws = tmp_path / "ws"
    write_params(ws, params_dict(prepared_root=str(demo_prepared / "data/prepared"), data={"val_fraction": 0.0}))
    monkeypatch.chdir(ws)
    assert main(["split", "demo"]) == 0
    split = json.loads((ws / "data/splits/demo/ratio-0.1_seed-0.json").read_text())
    assert split["validation"] == []
    capsys.readouterr()
    code = main(["train", "demo", "--method", "labeled-only", "--ratio", "0.1", "--seed", "0", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "nan" not in out
    assert "no validation images (data.val_fraction 0), so the final weights are the reported ones" in out, out
    run = ws / "data/runs/demo/ratio-0.1_seed-0/labeled-only"
    summary = json.loads((run / "train_log.json").read_text())["summary"]
    assert summary["best_val_dice"] is None and summary["best_step"] == summary["iterations"] == 2
    best = torch.load(run / "best.pt", weights_only=True)
    final = torch.load(run / "checkpoint.pt", weights_only=True)
    assert best["step"] == final["step"] == 2
    for net, weights in best["weights"].items():  # best.pt holds the last iteration's weights
        for key, value in weights.items():
            assert torch.equal(value, final["method"]["weights"][net][key]), (net, key)
