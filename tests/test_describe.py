"""`knowsam-bench describe`: the official parameter counts of KnowSAM's networks, per-part SAM counts."""

from __future__ import annotations

import json

from knowsam import config
from knowsam.cli import main


def test_describe_knowsam_polyp_gives_the_official_counts(capsys):
    params = config.profile_path("demo")
    code = main(["describe", "knowsam", "polyp", "--sam-arch", "vit_b", "--format", "json", "--params", str(params)])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    modules = info["modules"]
    assert (info["num_classes"], info["in_channels"], info["sam_arch"]) == (2, 3, "vit_b")
    assert modules["vnet"] == {"params": 3_265_986, "trainable": 3_265_986}
    assert modules["fusion"] == {"params": 40_548, "trainable": 40_548}
    assert modules["sam.prompt_heads"] == {"params": 11_156_992, "trainable": 11_156_992}  # 2 x 5,578,496
    # 12 encoder blocks x 2 x 295,872, and the mask decoder's 5 x 33,088 (the official decoder's 6 less the
    # MLP adapter its forward never calls)
    assert modules["sam.adapters"] == {"params": 7_266_368, "trainable": 7_266_368}
    assert modules["sam.mask_decoder"] == {"params": 4_058_340, "trainable": 0}  # SAM's, its MLPs included
    for frozen in ("sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder"):
        assert modules[frozen]["params"] > 0 and modules[frozen]["trainable"] == 0, frozen
    assert {"unet", "vnet", "fusion"} < set(modules)
    for key in ("params", "trainable"):  # the parts partition the method's parameters
        assert sum(m[key] for m in modules.values()) == info["total"][key]


def test_describe_text_table_for_a_baseline(capsys):
    assert main(["describe", "mt", "--params", str(config.profile_path("demo"))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mt at demo:")
    assert "student" in out and "total" in out.splitlines()[-1]
