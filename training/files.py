"""Folders written whole or not at all, with no dependency beyond the standard library.

A pipeline folder that a crash left half-written would load as a broken model, or not at all;
``replacing_folder`` writes into a temporary folder beside the target and puts it in place only
when the writing finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without an error, it
    becomes ``target`` (replacing what was there). On an error, ``target`` is left as it was.

    The old ``target`` is renamed away before the new one is renamed in, and deleted only after:
    at no moment is a half-deleted or half-written folder at ``target``. (A crash between the two
    renames leaves no ``target`` and the old one as ``.NAME.*.old`` beside it.)
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old)  # an empty folder is replaced by a rename
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_folder(src: str | os.PathLike, dst: str | os.PathLike, ignore=None) -> None:
    """``shutil.copytree(src, dst)`` that replaces ``dst`` whole (see ``replacing_folder``)."""
    if not Path(src).is_dir():
        raise NotADirectoryError(f"{src} is not a folder")
    with replacing_folder(dst) as tmp:
        shutil.copytree(src, tmp, ignore=ignore, dirs_exist_ok=True)
