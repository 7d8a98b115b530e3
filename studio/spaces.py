"""Hugging Face Spaces: everything the studio does differently there, in one place.

On a Space (``SPACE_ID`` is set) uploads are capped; on ZeroGPU hardware the generating calls
must run inside ``@spaces.GPU``. The ``spaces`` package exists only there, so ``gpu`` applies its
decorator when the package can be imported and is a no-op everywhere else. No Gradio here: the
engine uses ``gpu`` and must not import Gradio.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

GPU_DURATION = 120  # seconds of ZeroGPU time one generation may take (the default, 60, is short for sd15 batches)
SPACE_MAX_FILE_SIZE = "10mb"  # per uploaded file on a Space; references are pictures, not videos
MAX_FILE_SIZE = "50mb"  # per uploaded file elsewhere: a 16-megapixel PNG fits
SPACE_README = {  # the front matter of README.md that makes the repository a Gradio Space
    "title": "RetriNet Studio",
    "sdk": "gradio",
    "sdk_version": "6.31.0",
    "app_file": "app.py",
    "python_version": "3.11",
}


def on_space() -> bool:
    """True when running as a Hugging Face Space (the platform sets ``SPACE_ID``)."""
    return bool(os.environ.get("SPACE_ID"))


def launch_kwargs() -> dict[str, Any]:
    """Extra ``gr.Blocks.launch`` arguments for where the studio runs: the upload limit (smaller on a
    Space), and no folder served beyond Gradio's own upload and cache folders (``allowed_paths``
    empty: the studio hands Gradio every file it shows from a temporary folder)."""
    return {"max_file_size": SPACE_MAX_FILE_SIZE if on_space() else MAX_FILE_SIZE, "allowed_paths": []}


def gpu(fn: Callable | None = None, *, duration: int = GPU_DURATION):
    """``@spaces.GPU(duration=...)`` when the ``spaces`` package is importable, else ``fn`` unchanged."""

    def wrap(f: Callable) -> Callable:
        if importlib.util.find_spec("spaces") is None:
            return f
        import spaces  # only on Hugging Face Spaces

        return spaces.GPU(duration=duration)(f)

    return wrap(fn) if fn is not None else wrap
