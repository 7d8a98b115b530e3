"""What a run folder's checkpoints are, with no dependency beyond the standard library.

``training.core`` writes ``checkpoint-N`` folders (``trainer_state.json`` last, so its presence
marks a checkpoint complete); the studio lists them without importing Accelerate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, folder)``, oldest first; half-written ones are not listed."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)
