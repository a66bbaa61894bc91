"""What each stage of the DVC pipeline runs: the one list of every stage's code.

dvc.yaml's code deps are written from this table (``knowsam-bench pipeline --write``, compared by
``--check`` in CI), the run fingerprint reads the train stage's training sources from it
(``runs.TRAINING_SOURCES``), and tests/test_pipeline_deps.py runs every stage and checks that the
modules it executes are exactly what the table lists for it: none missing, no entry covering nothing.
Adding a module to the package means adding it here under each stage that executes it, then
``knowsam-bench pipeline --write``.

Paths are relative to the repository root, as dvc.yaml names them; a folder means every file
below it. The table is plain data; of the stages' code only ``runs`` imports it (so the stages that
run ``runs`` list this file too). dvc.yaml's writer is ``dvc_yaml``, which no stage executes.
"""

from __future__ import annotations

# How every stage starts: its script (stages/<stage>.py, listed by ``stage_code``) hands the command
# line to the CLI through stages/_entry.py, which loads the params (config: the schema) and checks
# them against the dataset registry.
ENTRY = (
    "stages/_entry.py",
    "knowsam/__init__.py",
    "knowsam/cli.py",
    "knowsam/config.py",
    "knowsam/errors.py",
    "knowsam/fileio.py",
    "knowsam/log.py",
    "knowsam/validation.py",
    "knowsam/data/__init__.py",
    "knowsam/data/sources.py",
)

# What the params check reads of the methods: their names and option dataclasses, without torch.
# A stage that runs the methods lists the whole package instead.
METHOD_REGISTRY = (
    "knowsam/methods/__init__.py",
    "knowsam/methods/params.py",
    "knowsam/methods/registry.py",
)

# The sources whose edits can change a trained run's numbers: the run fingerprint
# (``runs.TRAINING_SOURCES``). The train stage's other code only starts a run (command line, params
# checks, errors, file writing, device choice, downloads, this table). Reports are not here:
# re-scoring never needs retraining.
TRAINING = (
    "knowsam/config.py",
    "knowsam/data/augment.py",
    "knowsam/data/batch.py",
    "knowsam/data/dataset.py",
    "knowsam/data/geometry.py",
    "knowsam/data/three_point_affine.py",
    "knowsam/data/loader.py",
    "knowsam/data/splits.py",
    "knowsam/dice.py",
    "knowsam/distributed.py",
    "knowsam/losses.py",
    "knowsam/methods",
    "knowsam/models",
    "knowsam/run_state.py",
    "knowsam/runs.py",
    "knowsam/step_timing.py",
    "knowsam/train.py",
)

# Stage name (as in dvc.yaml) -> the code it runs besides its own script, in dvc.yaml's order.
STAGES: dict[str, tuple[str, ...]] = {
    "acquire": (
        *ENTRY,
        *METHOD_REGISTRY,
        "knowsam/data/acquire.py",
        "knowsam/data/demo.py",
        "knowsam/data/extract.py",
        "knowsam/download.py",
    ),
    "prepare": (
        *ENTRY,
        *METHOD_REGISTRY,
        "knowsam/data/prepare.py",
        "knowsam/data/frames.py",
        "knowsam/data/image_files.py",
        "knowsam/data/workers.py",
        "knowsam/data/masks.py",
        "knowsam/data/volumes.py",
        "knowsam/data/dataset.py",
    ),
    "embed": (
        *ENTRY,
        "knowsam/methods",
        "knowsam/data/batch.py",
        "knowsam/data/dataset.py",
        "knowsam/data/geometry.py",
        "knowsam/download.py",
        "knowsam/embed.py",
        "knowsam/machine.py",
        "knowsam/models",
        "knowsam/step_timing.py",
    ),
    "split": (
        *ENTRY,
        *METHOD_REGISTRY,
        "knowsam/data/dataset.py",
        "knowsam/data/splits.py",
    ),
    "train": (
        *ENTRY,
        # what starts a run without taking part in it: downloads, device choice, this table
        "knowsam/download.py",
        "knowsam/machine.py",
        "knowsam/pipeline.py",
        *TRAINING,
    ),
    "evaluate": (
        *ENTRY,
        "knowsam/data/augment.py",
        "knowsam/data/batch.py",
        "knowsam/data/dataset.py",
        "knowsam/data/geometry.py",
        "knowsam/dice.py",
        "knowsam/download.py",
        "knowsam/evaluate.py",
        "knowsam/losses.py",
        "knowsam/machine.py",
        "knowsam/methods",
        "knowsam/metrics.py",
        "knowsam/models",
        "knowsam/pipeline.py",
        "knowsam/run_state.py",
        "knowsam/runs.py",
        "knowsam/summaries.py",
        "knowsam/step_timing.py",
    ),
    "leaderboard": (
        *ENTRY,
        *METHOD_REGISTRY,
        "knowsam/data/dataset.py",
        "knowsam/dice.py",
        "knowsam/metrics.py",
        "knowsam/pipeline.py",
        "knowsam/report",
        "knowsam/runs.py",
        "knowsam/summaries.py",
    ),
}


def stage_code(stage: str) -> tuple[str, ...]:
    """Everything ``stage`` runs: its script, then its table entry (each path once, in the table's order)."""
    return tuple(dict.fromkeys((f"stages/{stage}.py", *STAGES[stage])))
