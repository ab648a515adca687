"""The Boutiques descriptor (``boutiques/bids-group.json``) is current, valid and usable.

* It equals the one generated from the click definition now (so it cannot drift: after changing
  an option, run ``python -m bids_group.boutiques boutiques/bids-group.json``).
* ``bosh validate`` accepts it (boutiques is a test extra; skipped when absent).
* The command line ``bosh exec simulate`` builds from an invocation is one bids-group's CLI parses
  to the intended values.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bids_group import boutiques
from bids_group.cli import cli, expand_multi_value_options

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "boutiques" / "bids-group.json"


def _bosh() -> str:
    exe = shutil.which("bosh") or str(Path(sys.executable).parent / "bosh")
    if not Path(exe).is_file():
        pytest.skip("boutiques (bosh) is not installed (pip install -e '.[test]')")
    return exe


def test_committed_descriptor_is_the_generated_one():
    assert DESCRIPTOR.read_text() == boutiques.descriptor_text(), (
        "boutiques/bids-group.json is stale: run "
        "`python -m bids_group.boutiques boutiques/bids-group.json`"
    )


def test_module_writes_the_descriptor(tmp_path):
    assert boutiques.main([str(tmp_path / "d.json")]) == 0
    assert (tmp_path / "d.json").read_text() == boutiques.descriptor_text()


def test_every_cli_parameter_is_an_input():
    descriptor = boutiques.build_descriptor()
    ids = {i["id"] for i in descriptor["inputs"]}
    for param in cli.params:
        if param.expose_value:
            assert param.name in ids or f"no_{param.name}" in ids, param.name
    assert descriptor["container-image"] == {"type": "docker", "image": "bids-group"}
    assert "docker build -t bids-group" in (ROOT / "Dockerfile").read_text()
    assert {e["code"] for e in descriptor["error-codes"]} >= {16, 64, 73}


def test_bosh_validate_accepts_the_descriptor():
    done = subprocess.run(
        [_bosh(), "validate", str(DESCRIPTOR)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_simulated_command_line_parses_to_the_invocation(tmp_path):
    invocation = {
        "bids_dir": "/data/ds",
        "out_dir": "/out",
        "analysis_level": "group",
        "model": "/data/model.yaml",
        "participant_labels": ["01", "02"],
        "derivatives": "/data/fmriprep",
        "two_sided": "--one-sided",
        "connectivity": "26",
        "smoothing_fwhm": 6.0,
        "ari_thresholds": [3.0, 3.5],
        "permutation": ["voxel", "tfce"],
        "n_perm": 500,
        "no_report": True,
        "resample": True,
        "n_jobs": 2,
        "overwrite": True,
    }
    path = tmp_path / "invocation.json"
    path.write_text(json.dumps(invocation))
    done = subprocess.run(
        [_bosh(), "exec", "simulate", "-i", str(path), str(DESCRIPTOR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = done.stdout.split("Generated Command:")[-1].strip().splitlines()[0]
    argv = shlex.split(line)
    assert argv[0] == "bids-group"
    ctx = cli.make_context("bids-group", expand_multi_value_options(argv[1:]), obj={})
    p = ctx.params
    assert (str(p["bids_dir"]), str(p["out_dir"]), p["analysis_level"]) == (
        "/data/ds",
        "/out",
        "group",
    )
    assert str(p["model"]) == "/data/model.yaml"
    assert p["participant_labels"] == ("01", "02")
    assert [str(d) for d in p["derivatives"]] == ["/data/fmriprep"]
    assert p["two_sided"] is False and p["connectivity"] == "26"
    assert p["smoothing_fwhm"] == 6.0 and p["ari_thresholds"] == (3.0, 3.5)
    assert p["permutation"] == ("voxel", "tfce") and p["n_perm"] == 500
    assert p["report"] is False and p["resample"] is True
    assert p["n_jobs"] == 2 and p["overwrite"] is True
