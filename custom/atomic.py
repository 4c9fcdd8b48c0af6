"""The project's one way to write a file or a folder: never a half-written one under the final name.

Why it exists: a crash, a full disk or ``kill -9`` in the middle of a write must leave either the old
file or folder or the new one, never a truncated checkpoint, mask, table or dataset. Python's standard
library has no atomic write. Standard library only, so the MONAI-free runner (``custom/deploy.py``) can use
it too.
"""

import errno
import glob
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path) -> Path:
    """A hidden, unused name in ``path``'s folder ending like ``path`` (so writers that pick a format by
    extension, such as nibabel, still do); same file system, so the final rename is atomic."""
    path = Path(path)
    return path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomically(path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` for a temporary file beside ``path``, fsync it, then rename it to ``path``.

    The folder of ``path`` is created if needed. If ``write`` (or anything after it) fails, the temporary
    file is removed and ``path`` is left as it was; an ``OSError`` gets a note naming ``path``. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException as err:
        temporary.unlink(missing_ok=True)
        if isinstance(err, OSError):  # a full disk or a read-only folder: say which file was being written
            err.add_note(f"while writing '{path}' (nothing was written under that name)")
        raise
    return path


def write_text_atomically(path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns ``path``."""
    return write_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8", newline=""))


def require_writable_folder(folder, create: bool = True) -> Path:
    """Create ``folder`` if needed and write (then remove) a temporary file in it; returns ``folder``.

    Commands call this before any long work, so a read-only folder, a full disk or a path under a file
    fails at once with an error naming the folder instead of hours later in the middle of a write. With
    ``create`` false a missing folder is not made: the nearest existing folder above it, where it would be made,
    is probed instead (for checks that run before a run may still be refused, which then leaves nothing behind).
    """
    folder = Path(folder)
    try:
        probed = folder
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            while not probed.exists() and probed.parent != probed:
                probed = probed.parent
        if not probed.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"'{probed}' is not a folder")
        probe = temporary_sibling(probed / "write-test")
        try:
            probe.write_bytes(b"\0")
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise OSError(f"output folder '{folder}' is not writable: {err.strerror or err}") from err
    return folder


def _sibling_folder(folder: Path, suffix: str) -> Path:
    """Create an empty hidden folder beside ``folder``: same file system, so renames are atomic; made by ``mkdir``,
    so its mode follows the umask like any folder the user makes (``tempfile.mkdtemp`` would give 0700)."""
    sibling = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.{suffix}"
    sibling.mkdir()
    return sibling


def _replace_folder(new: Path, folder: Path) -> None:
    """Rename the complete ``new`` to ``folder``; an existing ``folder`` is moved aside first and moved back if
    the rename fails, so ``folder`` is never lost."""
    if not folder.exists():
        new.rename(folder)
        return
    retired = _sibling_folder(folder, "old")
    try:
        folder.rename(retired / folder.name)
        try:
            new.rename(folder)
        except BaseException:
            (retired / folder.name).rename(folder)
            raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _name_leftover_siblings(folder: Path) -> None:
    """Warn about hidden sibling folders of ``folder`` that an earlier run killed mid-way left (a process killed
    with ``kill -9`` removes nothing; a converted dataset's is as large as the dataset). They are named, not
    removed: one may belong to a run still writing."""
    leftovers = sorted(folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp")) + sorted(
        folder.parent.glob(f".{glob.escape(folder.name)}.*.old")
    )
    if leftovers:
        listing = "\n  ".join(str(path) for path in leftovers)
        print(
            f"WARNING: temporary folder(s) of an interrupted write of '{folder}' (delete them unless that write is "
            f"still running):\n  {listing}",
            file=sys.stderr, flush=True,
        )


def write_folder_atomically(folder, write: Callable[[Path], object], overwrite: bool = False) -> Path:
    """Call ``write(temporary)`` for an empty temporary folder beside ``folder``, then rename it to ``folder``.

    The folder's ``write_atomically``: a converted dataset or a phantom cohort is complete under ``folder`` or
    not there. The parent folder is created if needed. An existing ``folder`` is replaced only with
    ``overwrite``, and only once the new one is complete. If anything fails, the temporary folder is removed
    and ``folder`` is left as it was. A ``folder`` that is or holds the working folder, or a mount point, is refused
    before ``write``.
    Returns ``folder``.
    """
    folder = Path(folder)
    working = Path.cwd().resolve()
    if folder.resolve() in (working, *working.parents):
        # '.' would get its temporary folder inside itself ('./..<id>.tmp'), and a working folder cannot be renamed
        raise ValueError(
            f"'{folder}' is or holds the working folder '{working}': it is written beside itself and renamed into "
            "place, which cannot replace the folder the command runs in; run the command from outside it"
        )
    if os.path.ismount(folder):  # renaming a mount point fails (EBUSY), after the whole write
        raise ValueError(
            f"'{folder}' is a mount point (a Docker volume?): it is written beside itself and renamed into place, "
            "which cannot replace a mount point; write into a folder inside it"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    _name_leftover_siblings(folder)
    work = _sibling_folder(folder, "tmp")
    try:
        write(work)
        if folder.exists() and not overwrite:
            raise FileExistsError(f"'{folder}' appeared while it was being written; pass --overwrite to replace it")
        _replace_folder(work, folder)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return folder
