"""Where the compiled kernels are cached when the install is read-only
(bids_group/inference/_numba_cache.py; the end-to-end case is in test_container.py).

The fallback folder holds code that numba loads and runs, so one that another user could have
made, replaced or written must never be used. An unwritable place is simulated by a path under
a regular file (mkdir fails there even for root)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numba
import pytest

from bids_group.inference import _numba_cache

UID = os.getuid()


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file: nothing can be created under it."""
    path = tmp_path / "a-file"
    path.write_text("")
    return path


@pytest.fixture
def no_home(tmp_path, blocker, monkeypatch):
    """HOME and XDG_CACHE_HOME unwritable; the system temp folder = tmp_path / "tmp"."""
    monkeypatch.setenv("HOME", str(blocker / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def test_user_cache_folder_when_home_is_writable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    chosen = _numba_cache._fallback_folder()
    assert chosen == tmp_path / "cache" / "bids-group" / "numba"
    assert chosen.stat().st_mode & 0o777 == 0o700


def test_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    """The XDG specification: a relative path is invalid (it would land in the working
    folder, possibly the input dataset)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _numba_cache._fallback_folder() == tmp_path / "home" / ".cache" / "bids-group" / "numba"
    assert not (tmp_path / "relative").exists()


def test_home_cache_folder_others_can_write_is_not_used(tmp_path, no_home, monkeypatch):
    planted = tmp_path / "shared-cache" / "bids-group" / "numba"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "shared-cache"))
    assert _numba_cache._fallback_folder() == no_home / f"bids-group-numba-{UID}"


def test_private_temp_folder_is_created_and_reused(no_home):
    first = _numba_cache._fallback_folder()
    assert first == no_home / f"bids-group-numba-{UID}"
    assert first.stat().st_mode & 0o777 == 0o700
    assert _numba_cache._fallback_folder() == first  # kept: compiled once per user


def test_temp_folder_others_can_write_is_not_used(no_home, caplog):
    planted = no_home / f"bids-group-numba-{UID}"
    planted.mkdir()
    planted.chmod(0o777)  # anyone could have put a cache file there
    with caplog.at_level(logging.WARNING):
        chosen = _numba_cache._fallback_folder()
    assert chosen != planted and chosen.parent == no_home
    assert chosen.stat().st_mode & 0o077 == 0
    assert "compiled again in every run" in caplog.text


def test_temp_folder_that_is_a_symlink_is_not_used(no_home, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (no_home / f"bids-group-numba-{UID}").symlink_to(target)
    chosen = _numba_cache._fallback_folder()
    assert chosen.resolve() != target.resolve() and not chosen.is_symlink()


def test_shared_temp_folder_without_sticky_bit_is_not_trusted(no_home):
    """In a group- or world-writable TMPDIR without the sticky bit (some HPC scratch), another
    user could swap our folder for theirs after the checks."""
    no_home.chmod(0o777)
    chosen = _numba_cache._fallback_folder()
    assert chosen.name != f"bids-group-numba-{UID}"
    no_home.chmod(0o1777)  # sticky, as /tmp: entries can only be replaced by their owner
    assert _numba_cache._fallback_folder().name == f"bids-group-numba-{UID}"


def test_nothing_changes_when_numba_can_cache_beside_the_source(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    _numba_cache.ensure_writable_cache(str(tmp_path / "kernels.py"))
    assert numba.config.CACHE_DIR == ""
    assert (tmp_path / "__pycache__").is_dir()


def test_a_writable_cache_folder_set_by_the_user_is_kept(tmp_path, blocker, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "mine"))
    _numba_cache.ensure_writable_cache(str(blocker / "kernels.py"))
    assert numba.config.CACHE_DIR == str(tmp_path / "mine")


def test_an_unwritable_cache_folder_set_by_the_user_is_replaced(
    blocker, no_home, monkeypatch, caplog
):
    """numba would fail as with no setting at all (read-only install): warn, use the fallback."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING):
        _numba_cache.ensure_writable_cache(str(blocker / "kernels.py"))
    assert numba.config.CACHE_DIR == str(no_home / f"bids-group-numba-{UID}")
    assert "cannot be written" in caplog.text and str(blocker / "cache") in caplog.text


def test_read_only_source_folder_redirects_numba(blocker, no_home, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    _numba_cache.ensure_writable_cache(str(blocker / "kernels.py"))
    assert numba.config.CACHE_DIR == str(no_home / f"bids-group-numba-{UID}")


# The kernels pre-compiled into a read-only folder of the image (BIDS_GROUP_NUMBA_SEED, see the
# Dockerfile) are copied into an empty cache; tests/test_container.py checks it in the image.


@pytest.fixture
def seed(tmp_path, blocker, monkeypatch) -> tuple[Path, str]:
    """A seed folder laid out as numba's cache for ``source``, a kernels file in a folder where
    nothing can be written (a read-only install), set in the env; an empty cache folder."""
    from numba.core.caching import _CacheLocator

    source = str(blocker / "kernels.py")
    (tmp_path / "cache").mkdir(mode=0o700)
    folder = tmp_path / "seed"
    sub = folder / _CacheLocator.get_suitable_cache_subpath(source)
    sub.mkdir(parents=True)
    (sub / "kernels.f-1.py311.nbi").write_bytes(b"index")
    (sub / "kernels.f-1.py311.1.nbc").write_bytes(b"code")
    (sub / "notes.txt").write_text("not numba's")
    for p in [folder, sub, *sub.iterdir()]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    monkeypatch.setenv(_numba_cache.SEED_ENV, str(folder))
    yield sub, source
    for p in [folder, sub]:
        p.chmod(0o755)


def test_seed_is_copied_into_an_empty_cache(tmp_path, seed):
    sub, source = seed
    _numba_cache._copy_seed(tmp_path / "cache", source)
    target = tmp_path / "cache" / sub.name
    assert sorted(p.name for p in target.iterdir()) == [
        "kernels.f-1.py311.1.nbc",
        "kernels.f-1.py311.nbi",
    ]
    assert (target / "kernels.f-1.py311.1.nbc").read_bytes() == b"code"
    assert all(p.stat().st_mode & 0o077 == 0 for p in [target, *target.iterdir()])


def test_seed_never_replaces_the_users_own_cache(tmp_path, seed):
    sub, source = seed
    mine = tmp_path / "cache" / sub.name
    mine.mkdir(parents=True)
    (mine / "kernels.f-1.py311.nbi").write_bytes(b"my index")
    _numba_cache._copy_seed(tmp_path / "cache", source)
    assert sorted(p.name for p in mine.iterdir()) == ["kernels.f-1.py311.nbi"]
    assert (mine / "kernels.f-1.py311.nbi").read_bytes() == b"my index"


@pytest.mark.parametrize("where", ["seed", "kernels", "file"])
def test_seed_others_could_change_is_not_used(tmp_path, seed, where):
    """Code that another user could have written is never copied (and so never run)."""
    sub, source = seed
    target = {"seed": sub.parent, "kernels": sub, "file": sub / "kernels.f-1.py311.1.nbc"}[where]
    target.chmod(target.stat().st_mode | 0o022)
    _numba_cache._copy_seed(tmp_path / "cache", source)
    copied = {p.name for p in (tmp_path / "cache").rglob("*")}
    assert "kernels.f-1.py311.1.nbc" not in copied
    if where != "file":
        assert not copied


def test_seed_symlinks_are_not_followed(tmp_path, seed):
    sub, source = seed
    sub.chmod(0o755)
    (tmp_path / "elsewhere.nbc").write_bytes(b"planted")
    (sub / "kernels.g-9.py311.1.nbc").symlink_to(tmp_path / "elsewhere.nbc")
    sub.chmod(0o555)
    _numba_cache._copy_seed(tmp_path / "cache", source)
    assert not (tmp_path / "cache" / sub.name / "kernels.g-9.py311.1.nbc").exists()
    assert (tmp_path / "cache" / sub.name / "kernels.f-1.py311.nbi").is_file()


def test_read_only_install_starts_from_the_seed(seed, no_home, monkeypatch):
    """The image's case: read-only install, no home; the fallback folder gets the seed."""
    sub, source = seed
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    _numba_cache.ensure_writable_cache(source)
    cache = Path(numba.config.CACHE_DIR)
    assert cache == no_home / f"bids-group-numba-{UID}"
    assert (cache / sub.name / "kernels.f-1.py311.nbi").read_bytes() == b"index"


def test_a_cache_folder_set_by_the_user_starts_from_the_seed(tmp_path, seed, monkeypatch):
    sub, source = seed
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "cache"))
    _numba_cache.ensure_writable_cache(source)
    assert (tmp_path / "cache" / sub.name / "kernels.f-1.py311.1.nbc").read_bytes() == b"code"


def test_relative_or_unset_seed_is_ignored(tmp_path, seed, monkeypatch):
    sub, source = seed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(_numba_cache.SEED_ENV, "seed")
    _numba_cache._copy_seed(tmp_path / "cache", source)
    monkeypatch.delenv(_numba_cache.SEED_ENV)
    _numba_cache._copy_seed(tmp_path / "cache", source)
    assert not any((tmp_path / "cache").iterdir())


def test_unreadable_seed_is_skipped_without_error(tmp_path, seed, monkeypatch):
    """Importing the kernels must not fail because of the seed (root reads any file, so the
    read error is simulated); no partial copy is left behind."""
    sub, source = seed

    def unreadable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    _numba_cache._copy_seed(tmp_path / "cache", source)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
