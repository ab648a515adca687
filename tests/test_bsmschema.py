"""The resolved model bids-group writes (``OUT_DIR/model-<name>_smdl.json``) is a valid BIDS Stats
Model: it validates against ``bsmschema`` (the specification's pydantic models, a test extra) for
every config in ``configs/`` and for the default model.

``bsmschema`` ignores unknown keys (its ``model_config`` spells ``extras``, which pydantic 2 does
not read), so the test also checks that the validated model, dumped back, keeps every key we
wrote: a key outside the schema would be dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bids_group.spec import default_spec, load_spec, resolved_model_dict

bsm = pytest.importorskip("bsmschema.models", reason="bsmschema is not installed (test extra)")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs").glob("*.json"))


def _keys(obj, prefix=""):
    """Every key path of a nested dict / list, e.g. ``Nodes.0.Model.X``."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{prefix}{key}"
            if key not in ("Instructions", "Software"):  # free-form by the specification
                yield from _keys(value, f"{prefix}{key}.")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _keys(value, f"{prefix}{i}.")


def _check(resolved: dict) -> None:
    model = bsm.BIDSStatsModel.model_validate(resolved)
    dumped = model.model_dump(exclude_none=True)
    dropped = set(_keys(resolved)) - set(_keys(dumped))
    assert not dropped, f"keys outside the BIDS Stats Models schema: {sorted(dropped)}"


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_resolved_model_of_each_config_validates(config):
    _check(resolved_model_dict(load_spec(config)))


def test_resolved_default_model_validates():
    _check(resolved_model_dict(default_spec()))
    _check(resolved_model_dict(default_spec(), x_columns=["1"]))


def test_written_model_file_validates(tmp_path, bids_derivatives):
    import json

    from bids_group.cli import main

    ds = bids_derivatives(n_subjects=6, shape=(5, 6, 5))
    out = tmp_path / "out"
    model = ROOT / "configs" / "two_sample_age.yaml"
    assert main([str(ds), str(out), "group", "--model", str(model), "--no-report", "-qq"]) == 0
    (path,) = out.glob("model-*_smdl.json")
    _check(json.loads(path.read_text()))
