"""Hostile and broken inputs: folder replaces killed at every step, catalogs and CSV tables with
bad bytes and bad records, decompression bombs, bad training configs and interrupted runs."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eclip.atomic import atomic_folder, recover_folder, recover_leftovers

# ----------------------------------------------------------------------------- folder replace

# The child writes `new` over `old` with atomic_folder and SIGKILLs itself before filesystem
# operation number KILL_AT (renames and removals, counted across the whole replace), or, with
# DURING, in the middle of it (a removal that deleted one file, a write that wrote one file).
_CHILD = textwrap.dedent("""
    import importlib.util, os, shutil, signal, sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("atomic", sys.argv[4])  # without the package: no torch import
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    target, kill_at, during = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    count = 0

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(real, partial):
        def op(*args, **kwargs):
            global count
            count += 1
            if count == kill_at:
                if during:
                    partial(*args)
                die()
            return real(*args, **kwargs)
        return op

    def remove_one(path, *_):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        if files:
            files[0].unlink()

    os.replace = counted(os.replace, lambda *a: None)
    shutil.rmtree = counted(shutil.rmtree, remove_one)
    with atomic.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
        if kill_at == 0:  # killed while the new content is half written
            die()
        (tmp / "b.txt").write_text("new")
    print("ops", count)
""")


def _run_child(target: Path, kill_at: int, during: bool = False) -> subprocess.CompletedProcess:
    import eclip.atomic

    return subprocess.run([sys.executable, "-c", _CHILD, str(target), str(kill_at), "1" if during else "0", eclip.atomic.__file__],
                          capture_output=True, text=True)


def _content(folder: Path) -> str:
    texts = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(texts) == ["a.txt", "b.txt"], texts  # whole: nothing missing, nothing extra
    assert len(set(texts.values())) == 1, texts  # never a mix of old and new
    return texts["a.txt"]


def _old_folder(parent: Path) -> Path:
    target = parent / "model"
    target.mkdir(parents=True)
    (target / "a.txt").write_text("old")
    (target / "b.txt").write_text("old")
    return target


def test_folder_replace_killed_at_every_step_loads_old_or_new(tmp_path):
    """SIGKILL before (and in the middle of) each rename and removal of a folder replace: the
    next load finds the old or the new folder, whole, and no leftover stays behind."""
    clean = _run_child(_old_folder(tmp_path / "clean"), kill_at=-1)
    assert clean.returncode == 0, clean.stderr
    ops = int(clean.stdout.split()[-1])
    assert ops >= 4  # the renames and removals of a replace
    assert _content(tmp_path / "clean" / "model") == "new"
    seen = []
    for kill_at in range(0, ops + 1):
        for during in (False, True):
            target = _old_folder(tmp_path / f"k{kill_at}{'d' if during else ''}")
            result = _run_child(target, kill_at, during)
            assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr)
            recover_folder(target)
            seen.append(_content(target))
            assert sorted(p.name for p in target.parent.iterdir()) == ["model"], (kill_at, during)
    assert {"old", "new"} == set(seen)  # some kills come before the new content is complete, some after


def test_model_folder_survives_a_kill_between_the_renames(tmp_path):
    """The case the issue saw: `model` renamed away, the new one not yet in place; loading the
    model finishes the swap."""
    import torch

    from eclip.io import load_model, save_model
    from eclip.model import ECLIP

    from .conftest import micro_config

    torch.manual_seed(0)
    first, second = ECLIP(micro_config()), ECLIP(micro_config())
    folder = save_model(first, tmp_path / "model")
    save_model(second, tmp_path / "staged")
    os.replace(tmp_path / "staged", tmp_path / ".model.new")  # step 2 done
    os.replace(folder, tmp_path / ".model.old")  # step 3 done, killed before step 4
    loaded = load_model(folder)
    torch.testing.assert_close(loaded.state_dict()["decoder.queries"], second.state_dict()["decoder.queries"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recovery_restores_old_and_spares_a_live_writer(tmp_path):
    target = _old_folder(tmp_path)
    os.replace(target, tmp_path / ".model.old")  # a replace of an earlier version killed mid-swap
    dead = tmp_path / ".model.tmpabcd1234"  # its unfinished temporary folder (no pid: dead)
    dead.mkdir()
    live = tmp_path / f".model.tmp{os.getpid()}.abcd1234"  # a writer at work in this process
    live.mkdir()
    assert recover_leftovers(tmp_path) == [target]
    assert _content(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]


def test_atomic_folder_that_raises_leaves_the_target(tmp_path):
    target = _old_folder(tmp_path)
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("half-way")
    assert _content(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
