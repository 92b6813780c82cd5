"""Writes that land whole or not at all: a reader, or a run killed half-way, never sees a
half-written file or folder.

A folder `X` is replaced in steps, each a rename in the same parent folder:

1. the new content is written into `.X.tmp<pid>.<random>` (the writer's process id in the name);
2. `.X.tmp...` -> `.X.new` (the new content is complete);
3. `X` -> `.X.old` (if there was an `X`);
4. `.X.new` -> `X`;
5. `.X.old` is removed.

A process killed at any step leaves leftovers that `recover_folder` resolves: a `.X.new` is
complete, so the swap is finished; without one, `.X.old` is put back if `X` is missing; a
`.X.tmp...` of a dead writer, or an `.X.old` beside an `X`, is removed. Every load of a folder
(`eclip.io.load_config`, a new replace, the trainer's start) runs it first, so `X` is always the
old or the new content. Steps 2-5 and recovery hold an exclusive lock on the parent folder, so
a reader never recovers in the middle of a live swap.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; recovery still works, without the live-swap guard
    fcntl = None

logger = logging.getLogger("eclip.atomic")

# `.X.old`, `.X.new`, `.X.tmp<pid>.<mkdtemp's 8 characters>` (and `.X.tmp<8>`, without the pid,
# as earlier versions named it)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:(?P<kind>old|new)|tmp(?:(?P<pid>\d+)\.)?[a-z0-9_]{8})$")


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (a power cut after the swap keeps it)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on `folder` (released by the kernel if the process dies)."""
    if fcntl is None or not hasattr(os, "O_DIRECTORY"):
        yield
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with suppress(OSError):  # a filesystem without flock (some network mounts): go on unguarded
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _recover_locked(target: Path) -> None:
    parent, name = target.parent, target.name
    new, old = parent / f".{name}.new", parent / f".{name}.old"
    if new.is_dir():  # killed after the new content was complete: finish the swap
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(new, target)
        logger.warning("%s: finished a folder replace that was interrupted (new content in place)", target)
    elif not target.exists() and old.is_dir():  # killed before the new content was complete
        os.replace(old, target)
        logger.warning("%s: restored the previous content after an interrupted folder replace", target)
    shutil.rmtree(old, ignore_errors=True)
    for leftover in parent.iterdir():
        match = _LEFTOVER.match(leftover.name)
        if not match or match.group("name") != name or match.group("kind") or not leftover.is_dir():
            continue
        pid = match.group("pid")
        if pid is None or not _alive(int(pid)):  # a live writer's folder is left to it
            shutil.rmtree(leftover, ignore_errors=True)
            logger.warning("%s: removed %s, left by a writer that did not finish", target, leftover.name)
    _fsync_dir(parent)


def recover_folder(target: str | Path) -> None:
    """Resolve the leftovers of an interrupted replace of folder `target` (see the module
    docstring): afterwards `target` holds the old or the new content, or does not exist if it
    never did. Cheap when there is nothing to do."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    prefix = f".{target.name}."
    if not any(p.name.startswith(prefix) for p in parent.iterdir()):
        return
    try:
        with _locked(parent):
            _recover_locked(target)
    except OSError as error:  # e.g. a read-only folder: the load that follows says what is missing
        logger.warning("%s: could not resolve the leftovers of an interrupted replace (%s)", target, error)


def recover_leftovers(parent: str | Path) -> list[Path]:
    """`recover_folder` for every folder in `parent` with leftovers; returns those folders."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    names = sorted({m.group("name") for p in parent.iterdir() if p.is_dir() and (m := _LEFTOVER.match(p.name))})
    for name in names:
        recover_folder(parent / name)
    return [parent / name for name in names]


def replace_folder(tmp: Path, target: Path) -> None:
    """Move a finished temporary folder into place (steps 2-5 of the module docstring); an
    older `target` is removed only after."""
    parent = target.parent
    new, old = parent / f".{target.name}.new", parent / f".{target.name}.old"
    with _locked(parent):
        _recover_locked(target)  # a leftover of an earlier, interrupted replace
        os.replace(tmp, new)
        _fsync_dir(parent)
        if target.exists():
            os.replace(target, old)
        os.replace(new, target)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """An empty temporary folder beside `target` (same filesystem: the rename is atomic) to
    write into; when the block ends it replaces `target`, and if the block raises it is
    removed and `target` is left as it was. A process killed at any point leaves `target`
    whole: old or new, as `recover_folder` finds it.

        with atomic_folder(out / "model") as tmp:
            (tmp / "config.json").write_text(...)
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp{os.getpid()}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, target)
