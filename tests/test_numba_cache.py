"""Where the compiled kernels are cached when the install is read-only
(bids_group/inference/_numba_cache.py; the end-to-end case is in test_container.py).

The fallback folder holds code that numba loads and runs, so one that another user could have
made or written must never be used. An unwritable place is simulated by a path under a regular
file (mkdir fails there even for root)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba
import pytest

from bids_group.inference import _numba_cache


@pytest.fixture
def no_home(tmp_path, monkeypatch):
    """HOME and XDG_CACHE_HOME unwritable, the system temp folder = tmp_path / "tmp"."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HOME", str(blocker / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def test_user_cache_folder_when_home_is_writable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert _numba_cache._fallback_folder() == tmp_path / "cache" / "bids-group" / "numba"


def test_private_temp_folder_is_created_and_reused(no_home):
    first = _numba_cache._fallback_folder()
    assert first == no_home / f"bids-group-numba-{os.getuid()}"
    assert first.stat().st_mode & 0o777 == 0o700
    assert _numba_cache._fallback_folder() == first  # kept: compiled once per user


def test_temp_folder_others_can_write_is_not_used(no_home):
    planted = no_home / f"bids-group-numba-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)  # anyone could have put a cache file there
    chosen = _numba_cache._fallback_folder()
    assert chosen != planted and chosen.parent == no_home
    assert chosen.stat().st_mode & 0o077 == 0


def test_temp_folder_that_is_a_symlink_is_not_used(no_home, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (no_home / f"bids-group-numba-{os.getuid()}").symlink_to(target)
    chosen = _numba_cache._fallback_folder()
    assert chosen.resolve() != target.resolve() and not chosen.is_symlink()


def test_nothing_changes_when_numba_can_cache_beside_the_source(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    _numba_cache.ensure_writable_cache(str(tmp_path / "kernels.py"))
    assert numba.config.CACHE_DIR == ""
    assert (tmp_path / "__pycache__").is_dir()


def test_a_cache_folder_set_by_the_user_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "mine"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _numba_cache.ensure_writable_cache(str(blocker / "kernels.py"))
    assert numba.config.CACHE_DIR == str(tmp_path / "mine")


def test_read_only_source_folder_redirects_numba(no_home, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    blocker = Path(os.environ["HOME"]).parent
    _numba_cache.ensure_writable_cache(str(blocker / "kernels.py"))
    assert numba.config.CACHE_DIR == str(no_home / f"bids-group-numba-{os.getuid()}")
