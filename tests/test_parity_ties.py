"""The parity check's handling of SAM pseudo-labels at a tie (``benchmarks/parity_official.py``).

These parts need no official checkout: which pixels count as a tie flip, how our mixing is given
the official label there, and how our iteration is rewound before it is run again.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def parity():
    with benchmark_script("parity_official") as module:
        yield module


def frames(official_soft: torch.Tensor, our_logits: torch.Tensor) -> tuple[dict, dict]:
    official = {"mix_up": {"pseudo_label": official_soft, "unlabel_pseudo_label": official_soft.argmax(1)}}
    return official, {"mixed": {"teacher": our_logits}}


def test_only_pixels_at_a_tie_whose_argmax_differs_are_flips(parity):
    soft = torch.tensor([[0.9, 0.1], [0.5 - 3e-8, 0.5 + 3e-8], [0.5 - 3e-8, 0.5 + 3e-8], [0.2, 0.8]])
    soft = soft.T.reshape(1, 2, 2, 2)  # one unlabeled image, 2 classes, 2x2 pixels
    ours = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).T.reshape(1, 2, 2, 2)
    labeled_row = torch.zeros(1, 2, 2, 2)  # ours covers the whole batch, labeled rows first
    official, mine = frames(soft, torch.cat([labeled_row, ours]))
    flips = parity.pseudo_label_tie_flips(official, mine)
    # pixel 0: same class; 1: a tie, other class (a flip); 2: a tie, same class; 3: other class, no tie (a fault)
    assert flips.flatten().tolist() == [False, True, False, False]


def test_no_mixed_stage_no_flips(parity):
    assert not parity.pseudo_label_tie_flips({"train": {}}, {"losses": {}}).any()


def test_given_labels_reach_our_mixing_at_those_pixels_only(parity):
    from knowsam.methods import knowsam

    x = torch.rand(4, 3, 8, 8)
    y_l = torch.zeros(2, 8, 8, dtype=torch.long)
    pseudo = torch.zeros(4, 8, 8, dtype=torch.long)
    where = torch.zeros(2, 8, 8, dtype=torch.bool)
    where[1, 3, 5] = True
    official = torch.ones(2, 8, 8, dtype=torch.long)
    fused = torch.full((4, 2, 8, 8), 0.5)
    original = knowsam.uncertainty_mix
    with parity.given_pseudo_labels(where, official):
        _, labels = knowsam.uncertainty_mix(x, y_l, pseudo, fused, 2, 4, 0)  # no patch swapped
    assert knowsam.uncertainty_mix is original
    assert labels[2:].nonzero().tolist() == [[1, 3, 5]]
    assert not labels[:2].any()


def test_a_rewound_iteration_runs_again_to_the_same_state(parity):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.rand(5, 3)

    def step() -> None:
        optimizer.zero_grad()
        layer(x).square().mean().backward()
        optimizer.step()

    step()  # a momentum buffer exists before the recorded iteration
    tensors = list(layer.parameters())
    first = parity.record_iteration(step, {"nets": optimizer}, tensors, {})
    parity.rewind(first, tensors, {"nets": optimizer})
    assert all(torch.equal(t, first.before[id(t)]) for t in tensors)
    again = parity.record_iteration(step, {"nets": optimizer}, tensors, {})
    assert all(torch.equal(again.after[id(t)], first.after[id(t)]) for t in tensors)
    assert not torch.equal(first.after[id(tensors[0])], first.before[id(tensors[0])])
