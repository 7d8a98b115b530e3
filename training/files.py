"""Files and folders written whole or not at all, with no dependency beyond the standard library.

A pipeline folder that a crash left half-written would load as a broken model, or not at all, and
a half-written ``job.json`` or ``manifest.json`` would not parse. ``replacing_folder`` and
``replacing_file`` write beside the target and put the result in place by a rename only when the
writing finished; ``write_text`` is the common case of the second.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends without an error, it
    becomes ``target`` (replacing what was there). On an error, ``target`` is left as it was.

    The old ``target`` is renamed away before the new one is renamed in, and deleted only after:
    at no moment is a half-deleted or half-written folder at ``target``. (If the second rename
    fails, the old folder is renamed back; a crash between the two renames leaves no ``target``
    and the old one as ``.NAME.*.old`` beside it.)
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
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def replacing_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a path beside ``target`` (not yet created) to write a file to; when the block ends
    without an error, the file is flushed to the disk and renamed to ``target`` (replacing what
    was there). On an error, or when the block wrote nothing, ``target`` is left as it was.

    The path is unique, so two writers of one target never write into each other's file: the last
    one to finish wins, whole.
    """
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder, not a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written for {target}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: str | os.PathLike, text: str) -> Path:
    """``Path(target).write_text(text)`` (UTF-8) that never leaves half a file (``replacing_file``)."""
    with replacing_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def copy_folder(src: str | os.PathLike, dst: str | os.PathLike, ignore=None) -> None:
    """``shutil.copytree(src, dst)`` that replaces ``dst`` whole (see ``replacing_folder``)."""
    if not Path(src).is_dir():
        raise NotADirectoryError(f"{src} is not a folder")
    with replacing_folder(dst) as tmp:
        shutil.copytree(src, tmp, ignore=ignore, dirs_exist_ok=True)
