"""The studio's engine: everything the tabs ask for, behind typed requests, with no Gradio in it.

The tabs (``studio/*_tab.py``) know widgets and events; they call the engine and turn its
``ValueError`` into ``gr.Error``. The engine owns the shared, read-only state (parsed data sets
now; model families later) and is never mutated per request.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.concepts import CONCEPTS
from training.data import toybooru
from training.data.retribooru import open_record, prepare_reference, read_annotations

DEFAULT_TOYBOORU = {"num_images": 240, "seed": 0, "size": 128}


def cache_dir() -> Path:
    """Where the studio keeps what it makes for itself (``RETRINET_STUDIO_CACHE`` overrides)."""
    env = os.environ.get("RETRINET_STUDIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "retrinet-studio"


@dataclass(frozen=True)
class DatasetInfo:
    path: str
    num_records: int
    splits: dict[str, int]
    num_characters: int
    num_clusters: int
    skipped: dict[str, int]


@dataclass(frozen=True)
class RecordRequest:
    path: str
    index: int
    split: str = "all"  # "all" or a split name; the index counts within it
    crop_size: int = 256


@dataclass
class RecordView:
    record: dict[str, Any]
    position: int  # index within the split
    count: int  # records in the split
    image: Image.Image
    mask: Image.Image
    face_bbox: tuple[int, int, int, int]
    crops: list[tuple[Image.Image, str]]  # (picture, caption) per concept, as the loader makes them
    similar: list[tuple[Image.Image, str]] = field(default_factory=list)


class _Dataset:
    def __init__(self, path: Path):
        records, self.skipped = read_annotations(path)
        self.path = path
        self.by_id = {r["id"]: r for r in records}
        self.split_ids: dict[str, list[str]] = {"all": [r["id"] for r in records]}
        for r in records:
            self.split_ids.setdefault(str(r.get("split", "all")), []).append(r["id"])
        if not records:
            raise ValueError(f"{path}: annotations.jsonl holds no usable record")

    def info(self) -> DatasetInfo:
        recs = self.by_id.values()
        return DatasetInfo(
            path=str(self.path), num_records=len(self.by_id),
            splits={k: len(v) for k, v in self.split_ids.items() if k != "all"},
            num_characters=len({r.get("character") for r in recs}),
            num_clusters=len({r.get("cluster", (r.get("character"), r.get("artist"), r.get("outfit"))) for r in recs}),
            skipped=dict(self.skipped),
        )

    def open(self, rec: dict[str, Any]) -> tuple[Image.Image, Image.Image]:
        return open_record(self.path, rec)  # CorruptFile is a ValueError


class Engine:
    """Shared back end of the studio. Thread-safe: requests may come from several users."""

    def __init__(self, zoo: str = "demo", config: str | None = None, data: str | None = None):
        if zoo not in ("demo", "sd15"):
            raise ValueError(f"unknown model family {zoo!r}; expected 'demo' or 'sd15'")
        self.zoo, self.config = zoo, config
        self.default_data = data
        self._datasets: OrderedDict[Path, _Dataset] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ data sets

    def ensure_default_dataset(self) -> str:
        """The data set the Data tab opens first: ``--data``, or a small Toybooru made once."""
        if self.default_data:
            return self.default_data
        a = DEFAULT_TOYBOORU
        path = cache_dir() / f"toybooru-n{a['num_images']}-s{a['seed']}-px{a['size']}"
        if not (path / "annotations.jsonl").is_file():
            toybooru.generate(path, a["num_images"], a["seed"], a["size"], overwrite=path.exists())
        self.default_data = str(path)
        return self.default_data

    def _dataset(self, path: str) -> _Dataset:
        if not path or not str(path).strip():
            raise ValueError("no data set folder given")
        p = Path(path).expanduser().resolve()
        if not p.is_dir():
            raise ValueError(f"{path} is not a folder")
        if not (p / "annotations.jsonl").is_file():
            raise ValueError(f"{path} has no annotations.jsonl; is it a RetriBooru-style folder?")
        with self._lock:
            if p in self._datasets:
                self._datasets.move_to_end(p)
                return self._datasets[p]
        ds = _Dataset(p)
        with self._lock:
            self._datasets[p] = ds
            while len(self._datasets) > 4:
                self._datasets.popitem(last=False)
        return ds

    def dataset_info(self, path: str) -> DatasetInfo:
        return self._dataset(path).info()

    def reload(self, path: str) -> DatasetInfo:
        """Forget a cached data set (it changed on disk) and read it again."""
        with self._lock:
            self._datasets.pop(Path(path).expanduser().resolve(), None)
        return self.dataset_info(path)

    def record(self, req: RecordRequest) -> RecordView:
        """One picture with its annotations, concept crops and ``similar`` pictures."""
        ds = self._dataset(req.path)
        ids = ds.split_ids.get(req.split)
        if ids is None:
            raise ValueError(f"no split {req.split!r}; this data set has {', '.join(sorted(ds.split_ids))}")
        if not 0 <= req.index < len(ids):
            raise ValueError(f"picture {req.index} does not exist; split {req.split!r} has {len(ids)}")
        if not 32 <= req.crop_size <= 1024:
            raise ValueError(f"crop size {req.crop_size} is outside 32..1024")
        rec = ds.by_id[ids[req.index]]
        image, mask = ds.open(rec)
        crops = []
        for concept in CONCEPTS:
            picture, got = prepare_reference(image, mask, rec["face_bbox"], concept, req.crop_size)
            caption = concept if got == concept else f"{concept} -> {got} (no clothes below the head)"
            crops.append((picture, caption))
        similar = []
        for sid in rec["similar"]:
            other = ds.by_id.get(sid)
            if other is None:
                similar.append((Image.new("RGB", (64, 64), (200, 200, 200)), f"{sid} (missing)"))
                continue
            try:
                similar.append((ds.open(other)[0], sid))
            except ValueError:
                similar.append((Image.new("RGB", (64, 64), (200, 200, 200)), f"{sid} (unreadable)"))
        box = tuple(int(v) for v in rec["face_bbox"])
        return RecordView(rec, req.index, len(ids), image, mask, box, crops, similar)  # type: ignore[arg-type]
