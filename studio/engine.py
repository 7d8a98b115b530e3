"""The studio's engine: everything the tabs ask for, behind typed requests, with no Gradio in it.

The tabs (``studio/*_tab.py``) know widgets and events; they call the engine and turn its
``ValueError`` into ``gr.Error``. The engine owns the shared, read-only state (parsed data sets,
the model family's ``ModelZoo``, loaded lazily) and is never mutated per request: every
generation gets its own ``torch.Generator`` per picture, so the same inputs and seed give the
same pictures whoever asks.

- Compose (RetriNet, seed 001 / 002): ``crop`` cuts a picture into concept cards, ``compose``
  generates from a prompt and (picture, concept) references;
- Variations (Semantica, seed 004): ``vary``;
- the character library: ``save_character`` / ``list_characters`` / ``load_character``, saved
  in the workspace folder, plus the examples bundled in ``assets/examples``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from pipelines.concepts import CONCEPTS, load_image
from pipelines.zoo import ROOT, MissingModel, ModelZoo
from studio.checks import check_integer as _integer
from studio.checks import check_number as _number
from studio.spaces import gpu, on_space
from training.data import toybooru
from training.data.retribooru import open_record, prepare_reference, read_annotations
from training.files import replacing_folder

if TYPE_CHECKING:
    from pipelines.retrinet import Reference

DEFAULT_TOYBOORU = {"num_images": 240, "seed": 0, "size": 128}
EXAMPLES = ROOT / "assets" / "examples"  # bundled characters: <name>/character.json + pictures

WHOLE = "whole"  # a reference taken as dropped, background and all; the model reads it as "figure"
CHOICES = (*CONCEPTS, WHOLE)  # what a reference card may give: face, clothes, figure or the whole picture
MAX_REFERENCES = 8  # RetriNet's default max_references; the model's own limit is checked too
MAX_IMAGES = 8  # pictures per request: a batch that still fits a consumer GPU at 512 px
MAX_STEPS = 200
MAX_GUIDANCE = 50.0  # beyond this, classifier-free guidance only burns the picture
MAX_PROMPT = 1000  # characters: CLIP reads 77 tokens; a longer text is a mistake or an attack
MAX_SEED = 2**32 - 1  # seeds are 32-bit so that they can be typed, shown and shared
RANDOMISE = -1  # the seed that asks for a new random seed (so does the string "randomise")
SIZES = (32, 2048)  # allowed width / height in pixels, multiples of SIZE_STEP
SIZE_STEP = 8  # the VAE downsampling factor of SD 1.5; the demo family's is smaller
NAME = re.compile(r"[A-Za-z0-9_\- ]{1,64}")  # character names: letters, digits, -, _, space


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


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class CropRequest:
    image: Any  # a PIL picture, a path or bytes
    position: int = 0  # where the card sits among the references; sets the default concept (see ``crop``)


@dataclass
class ConceptCard:
    """A reference picture cut into concepts, as the Compose tab shows it."""

    picture: Image.Image  # the picture as read (RGB, EXIF rotation applied)
    overlay: Image.Image  # the picture with the background dimmed and the head box drawn
    mask: Image.Image  # the figure mask, L 0/255
    head_box: Box | None
    crops: dict[str, Image.Image]  # the choices that could be cut ("face", "clothes", "figure", "whole")
    concept: str  # the default choice
    rule: str  # which rule cut the concepts, in words


@dataclass(frozen=True)
class ComposeRequest:
    prompt: str
    references: Sequence[tuple[Any, str]]  # (picture, choice): choice in CHOICES
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 5.0  # classifier-free guidance on the prompt; <= 1 turns it off
    retrieval_scale: float = 1.0  # multiplies what RetriNet adds; 0 gives the base model
    seed: int | str = RANDOMISE  # RANDOMISE or "randomise" draws one and reports it
    num_images: int = 1
    width: int | None = None  # None: the model's own size
    height: int | None = None


@dataclass(frozen=True)
class VaryRequest:
    image: Any  # a PIL picture, a path or bytes
    num_images: int = 4
    guidance: float = 0.5  # Semantica's w >= 0 (0.5 in the paper's ablations); 0: conditional only
    steps: int = 20
    seed: int | str = RANDOMISE
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Picture:
    """One generated picture and everything needed to make it again."""

    image: Image.Image
    seed: int  # the seed of this picture's own generator
    settings: dict[str, Any]  # the request's settings (prompt, steps, guidance, ...)

    def caption(self) -> str:
        s = self.settings
        parts = [f"seed {self.seed}", f"{s['steps']} steps", f"guidance {s['guidance']:g}"]
        if "retrieval_scale" in s:
            parts.append(f"retrieval {s['retrieval_scale']:g}")
        parts.append(f"{self.image.width}x{self.image.height}")
        return " · ".join(parts)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a PNG that carries its parameters (``parameters`` text chunk, JSON)."""
        info = PngInfo()
        info.add_text("parameters", json.dumps({"seed": self.seed, **self.settings}, sort_keys=True))
        self.image.save(path, pnginfo=info)
        return Path(path)


@dataclass
class Generation:
    pictures: list[Picture]
    seed: int  # the first picture's seed; picture i has seed + i (mod 2**32)
    references: list[tuple[Image.Image, str]] = field(default_factory=list)  # what the model read: (crop, concept)


@dataclass(frozen=True)
class CharacterInfo:
    name: str
    source: str  # "saved" (the workspace) or "example" (bundled)
    num_references: int


@dataclass
class Character:
    name: str
    source: str
    references: list[tuple[Image.Image, str]]  # (the picture as saved, its choice)


Progress = Callable[[int, int], None]  # (steps done, steps in all), called after every denoising step


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


def resolve_seed(seed: float | str | None) -> int:
    """The seed to use: ``seed`` itself (0..2**32-1), or a fresh random one for -1 / "randomise"."""
    if seed is None or seed == RANDOMISE or (isinstance(seed, str) and seed.strip().lower() in ("randomise", "randomize")):
        return secrets.randbelow(MAX_SEED + 1)  # never the global RNG: users do not disturb each other
    if isinstance(seed, str):
        try:
            seed = int(seed.strip())
        except ValueError:
            raise ValueError(f"seed must be a whole number in 0..{MAX_SEED}, -1 or 'randomise', got {seed!r}") from None
    return _integer("seed", seed, 0, MAX_SEED)


def _size(what: str, value: Any) -> int | None:
    if value is None or value == 0:
        return None
    v = _integer(what, value, *SIZES)
    if v % SIZE_STEP:
        raise ValueError(f"{what} {v} is not a multiple of {SIZE_STEP}")
    return v


def _picture(what: str, image: Any) -> Image.Image:
    if image is None or (isinstance(image, (str, bytes)) and not image):
        raise ValueError(f"{what}: no picture given")
    try:
        return load_image(image)
    except FileNotFoundError as e:
        raise ValueError(f"{what}: no such file {e.filename}") from e
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e


def _digest(image: Image.Image) -> str:
    h = hashlib.sha1(image.tobytes())
    h.update(f"{image.mode}{image.size}".encode())
    return h.hexdigest()


def _overlay(image: Image.Image, mask: Image.Image, head_box: Box | None) -> Image.Image:
    """``image`` with the background outside ``mask`` faded and the head box drawn in red."""
    faded = Image.blend(image, Image.new("RGB", image.size, (255, 255, 255)), 0.65)
    out = Image.composite(image, faded, mask.convert("L"))
    if head_box is not None:
        width = max(1, round(min(image.size) / 96))
        ImageDraw.Draw(out).rectangle((head_box[0], head_box[1], head_box[2] - 1, head_box[3] - 1),
                                      outline=(239, 68, 68), width=width)
    return out


def _write_atomically(folder: Path, files: dict[str, Callable[[Path], Any]]) -> None:
    """Make ``folder`` hold exactly ``files`` (name -> writer), all at once: written beside it, then swapped in."""
    with replacing_folder(folder) as tmp:
        for name, write in files.items():
            write(tmp / name)


class Engine:
    """Shared back end of the studio. Thread-safe: requests may come from several users."""

    def __init__(self, zoo: str = "demo", config: str | None = None, data: str | None = None,
                 device: str | None = None, workspace: str | os.PathLike | None = None,
                 models: ModelZoo | None = None, examples: str | os.PathLike = EXAMPLES, shared: bool | None = None):
        """``zoo`` / ``config`` / ``device`` choose the model family (``ModelZoo.load``; no model is
        loaded before it is needed), or ``models`` gives a ready ``ModelZoo``. ``workspace``: where the
        character library lives (default: ``cache_dir()``). ``shared`` (default: on a Hugging Face
        Space): strangers share this studio, so no local path is accepted (the Data tab opens the
        studio's own data set only) and nothing is saved to the character library, which every
        visitor would see."""
        if models is None:
            if zoo not in ("demo", "sd15"):
                raise ValueError(f"unknown model family {zoo!r}; expected 'demo' or 'sd15'")
            models = ModelZoo.load(zoo, config, device)
        self.models = models
        self.shared = on_space() if shared is None else bool(shared)
        self.zoo, self.config = models.spec.family, config
        self.default_data = data
        self.workspace = Path(workspace) if workspace is not None else None
        self.examples = Path(examples)
        self._datasets: OrderedDict[Path, _Dataset] = OrderedDict()
        self._crops: OrderedDict[str, Any] = OrderedDict()  # picture digest -> ConceptCrops
        self._lock = threading.Lock()
        self._run_locks = {"retrinet": threading.Lock(), "semantica": threading.Lock(), "extractor": threading.Lock()}

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
        if self.shared and (self.default_data is None or p != Path(self.default_data).expanduser().resolve()):
            raise ValueError("this studio is shared (a Hugging Face Space): local paths are not accepted; "
                             "only its own data set can be opened")
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

    # ------------------------------------------------------------------ models

    def _model(self, name: str):
        """A model of the family; a model it does not configure says where to get one."""
        what = {"retrinet": "RetriNet", "semantica": "Semantica", "extractor": "concept detector", "clip": "CLIP"}[name]
        try:
            return getattr(self.models, name)()
        except MissingModel as e:
            trainer = {"retrinet": "training.train_retrinet", "semantica": "training.train_semantica"}.get(name)
            hint = (f" Train one in the Train tab (or `accelerate launch -m {trainer}`), then point the model config "
                    f"at its output folder." if trainer else "")
            raise MissingModel(f"No {what} model for the {self.zoo!r} family: {e}.{hint}") from e

    # ------------------------------------------------------------------ models trained in the Train tab

    def use_model(self, name: str, folder: str | os.PathLike) -> None:
        """Make later ``compose`` (``name`` "retrinet") or ``vary`` ("semantica") calls use the pipeline
        saved in ``folder`` (``JobManager.use_checkpoint`` makes one from a training checkpoint). The
        pipeline loads here, by the model family's own loader, so a bad folder fails now; a generation
        already running finishes with the model it started with."""
        import dataclasses

        if name not in ("retrinet", "semantica"):
            raise ValueError(f"unknown model {name!r}; expected 'retrinet' or 'semantica'")
        path = Path(folder)
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{folder} is not a saved {name} pipeline (no model_index.json)")
        zoo = self.models
        spec = dataclasses.replace(zoo.spec, **{name: str(path)})
        pipe = getattr(ModelZoo(spec, device=zoo.device), name)()  # ValueError naming the folder if it cannot load
        with self._run_locks[name], zoo._lock:  # no generation of this model runs while it is swapped
            zoo._models[name] = pipe
            zoo.spec = dataclasses.replace(zoo.spec, **{name: str(path)})

    # ------------------------------------------------------------------ compose: concept cards

    def _extract(self, image: Image.Image):
        key = _digest(image)
        with self._lock:
            if key in self._crops:
                self._crops.move_to_end(key)
                return self._crops[key]
        extractor = self._model("extractor")
        with self._run_locks["extractor"]:  # the detector's predictor is not thread-safe
            crops = extractor.extract(image)
        with self._lock:
            self._crops[key] = crops
            while len(self._crops) > 64:
                self._crops.popitem(last=False)
        return crops

    def crop(self, req: CropRequest) -> ConceptCard:
        """Find the head and the figure, cut face / clothes / figure by RetriBooru's rules (seed 002,
        A.4), and pick the card's default: the paper draws "face" or "clothes" with equal
        probability; the studio alternates them by position (first picture: face, second: clothes,
        ...), then applies the rules: "clothes" stays whole as "figure" when the head ends below
        2/3 of the height or nothing lies below it, and without a head every concept is "figure"."""
        position = _integer("position", req.position, 0, 10_000)
        image = _picture("picture", req.image)
        cut = self._extract(image)
        crops = {**cut.crops(), WHOLE: cut.image}
        wanted = "face" if position % 2 == 0 else "clothes"
        concept = wanted if wanted in crops else "figure"
        return ConceptCard(picture=cut.image, overlay=_overlay(cut.image, cut.mask, cut.head_box), mask=cut.mask,
                           head_box=cut.head_box, crops=crops, concept=concept, rule=cut.rule)

    def _reference(self, index: int, image: Any, choice: str) -> Reference:
        """What the model reads for one reference: the picture, its concept word, and where it was cut from in
        the picture (``ConceptCrops.region``; None for the whole picture)."""
        from pipelines.retrinet import Reference

        picture = _picture(f"reference {index + 1}", image)
        if choice == WHOLE:
            return Reference(picture, "figure")
        crops = self._extract(picture)
        cut = crops.crops().get(choice)
        if cut is None:
            raise ValueError(f"reference {index + 1}: no {choice} can be cut from this picture ({crops.rule}); "
                             f"choose 'figure' or 'whole'")
        return Reference(cut, choice, crops.region(choice))

    # ------------------------------------------------------------------ compose: generation

    def compose(self, req: ComposeRequest, progress: Progress | None = None) -> Generation:
        """RetriNet: ``num_images`` pictures from the prompt and the references' concepts.

        Picture i is drawn from its own generator seeded with ``seed + i``, so each can be made again
        alone; ``progress(done, total)`` is called after every denoising step.
        """
        # 1. Check inputs, cheapest first
        prompt = "" if req.prompt is None else req.prompt
        negative = "" if req.negative_prompt is None else req.negative_prompt
        check_prompt(prompt, negative)
        steps = _integer("steps", req.steps, 1, MAX_STEPS)
        guidance = _number("guidance", req.guidance, 0.0, MAX_GUIDANCE)
        retrieval = _number("retrieval scale", req.retrieval_scale, 0.0, 10.0)
        n = _integer("number of pictures", req.num_images, 1, MAX_IMAGES)
        width, height = _size("width", req.width), _size("height", req.height)
        refs = list(req.references or [])
        if not refs:
            raise ValueError("no reference given: drop at least one picture of the character")
        if len(refs) > MAX_REFERENCES:
            raise ValueError(f"{len(refs)} references given, at most {MAX_REFERENCES} are supported")
        for i, ref in enumerate(refs):
            if not isinstance(ref, (tuple, list)) or len(ref) != 2:
                raise ValueError(f"reference {i + 1} must be a (picture, concept) pair")
            if ref[1] not in CHOICES:
                raise ValueError(f"reference {i + 1}: unknown concept {ref[1]!r}; expected one of {', '.join(CHOICES)}")
        seed = resolve_seed(req.seed)

        # 2. Cut the references, then generate
        references = [self._reference(i, image, choice) for i, (image, choice) in enumerate(refs)]
        pipe = self._model("retrinet")
        with self._run_locks["retrinet"]:  # the scheduler holds per-call state
            images = _run(pipe, progress, seeds=_seeds(seed, n), prompt=prompt,
                          references=references, negative_prompt=negative or None,
                          num_inference_steps=steps, guidance_scale=guidance, retrieval_scale=retrieval,
                          num_images_per_prompt=n, height=height, width=width)
        settings = {"model": "retrinet", "family": self.zoo, "prompt": prompt, "negative_prompt": negative,
                    "steps": steps, "guidance": guidance, "retrieval_scale": retrieval,
                    "concepts": [choice for _, choice in refs], "width": images[0].width, "height": images[0].height}
        return Generation([Picture(im, s, settings) for im, s in zip(images, _seeds(seed, n))], seed,
                          [(r.image, r.concept) for r in references])

    # ------------------------------------------------------------------ variations

    def vary(self, req: VaryRequest, progress: Progress | None = None) -> Generation:
        """Semantica: ``num_images`` variations of one picture, guidance w >= 0 (seed 004, Sec. 5)."""
        n = _integer("number of pictures", req.num_images, 1, MAX_IMAGES)
        guidance = _number("guidance", req.guidance, 0.0, MAX_GUIDANCE)
        steps = _integer("steps", req.steps, 1, MAX_STEPS)
        width, height = _size("width", req.width), _size("height", req.height)
        seed = resolve_seed(req.seed)
        image = _picture("picture", req.image)
        pipe = self._model("semantica")
        with self._run_locks["semantica"]:
            images = _run(pipe, progress, seeds=_seeds(seed, n), image=image, num_images_per_prompt=n,
                          guidance_scale=guidance, num_inference_steps=steps, height=height, width=width)
        settings = {"model": "semantica", "family": self.zoo, "steps": steps, "guidance": guidance,
                    "width": images[0].width, "height": images[0].height}
        return Generation([Picture(im, s, settings) for im, s in zip(images, _seeds(seed, n))], seed)

    # ------------------------------------------------------------------ the character library

    def library(self) -> Path:
        """The folder of saved characters: ``<workspace>/characters``."""
        return (self.workspace if self.workspace is not None else cache_dir()) / "characters"

    def _example_names(self) -> list[str]:
        if not self.examples.is_dir():
            return []
        return sorted(p.name for p in self.examples.iterdir() if (p / "character.json").is_file())

    def save_character(self, name: str, references: Sequence[tuple[Any, str]]) -> CharacterInfo:
        """Save (picture, choice) references under ``name``, replacing a saved character of that name."""
        name = check_name(name)
        if self.shared:
            raise ValueError("this studio is shared (a Hugging Face Space): a saved character would be shown to every "
                             "visitor, so saving is off here; run the studio on your own machine to keep characters")
        if name in self._example_names():
            raise ValueError(f"{name!r} is a bundled example; choose another name")
        refs = list(references or [])
        if not 1 <= len(refs) <= MAX_REFERENCES:
            raise ValueError(f"a character has 1 to {MAX_REFERENCES} references, {len(refs)} given")
        pictures = []
        for i, (image, choice) in enumerate(refs):
            if choice not in CHOICES:
                raise ValueError(f"reference {i + 1}: unknown concept {choice!r}; expected one of {', '.join(CHOICES)}")
            pictures.append(_picture(f"reference {i + 1}", image))
        entries = [{"file": f"{i:02d}.png", "concept": c} for i, (_, c) in enumerate(refs)]
        files: dict[str, Callable[[Path], Any]] = {e["file"]: im.save for e, im in zip(entries, pictures)}
        meta = {"name": name, "references": entries}
        files["character.json"] = lambda path: path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        self.library().mkdir(parents=True, exist_ok=True)
        with self._lock:
            _write_atomically(self.library() / name, files)
        return CharacterInfo(name, "saved", len(entries))

    def list_characters(self) -> list[CharacterInfo]:
        """Saved characters (by name), then the bundled examples (only these when ``shared``)."""
        out = []
        saved = [] if self.shared else self._saved_names()
        for source, root, names in (("saved", self.library(), saved),
                                    ("example", self.examples, self._example_names())):
            for name in names:
                try:
                    meta = _read_character(root / name)
                except ValueError:
                    continue  # a damaged folder is not listed; load_character says what is wrong
                out.append(CharacterInfo(name, source, len(meta["references"])))
        return out

    def _saved_names(self) -> list[str]:
        root = self.library()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if NAME.fullmatch(p.name) and (p / "character.json").is_file())

    def load_character(self, name: str) -> Character:
        """A saved character, or a bundled example, by name."""
        name = check_name(name)
        for source, root in (("saved", self.library()), ("example", self.examples))[1 if self.shared else 0:]:
            folder = root / name
            if (folder / "character.json").is_file():
                meta = _read_character(folder)
                refs = [(_picture(f"{name}/{e['file']}", folder / e["file"]), e["concept"]) for e in meta["references"]]
                return Character(name, source, refs)
        raise ValueError(f"no character named {name!r}")


def check_prompt(prompt: Any, negative: Any = "") -> None:
    """A prompt and a negative prompt: text of at most ``MAX_PROMPT`` characters each."""
    for what, text in (("the prompt", prompt), ("the negative prompt", negative)):
        if not isinstance(text, str):
            raise ValueError(f"{what} must be text, got {type(text).__name__}")  # noqa: TRY004
        if len(text) > MAX_PROMPT:
            raise ValueError(f"{what} has {len(text)} characters, at most {MAX_PROMPT} are read "
                             f"(the text encoder sees 77 tokens)")


def check_name(name: Any) -> str:
    """A character name: letters, digits, '-', '_' and spaces, 1 to 64 of them (no paths)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a character needs a name")
    name = name.strip()
    if not NAME.fullmatch(name):
        raise ValueError(f"character name {name!r} may hold only letters, digits, '-', '_' and spaces "
                         f"(at most 64)")
    return name


def _read_character(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "character.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / 'character.json'} cannot be read: {e}") from e
    refs = meta.get("references") if isinstance(meta, dict) else None
    if not isinstance(refs, list) or not refs:
        raise ValueError(f"{folder / 'character.json'} lists no references")
    for e in refs:
        if not isinstance(e, dict) or e.get("concept") not in CHOICES or not isinstance(e.get("file"), str) \
                or Path(e["file"]).name != e["file"] or e["file"].startswith("."):
            raise ValueError(f"{folder / 'character.json'}: bad reference entry {e!r}")
    return meta


def _seeds(seed: int, n: int) -> list[int]:
    """The seeds of the ``n`` pictures of a request: ``seed``, ``seed + 1``, ... modulo 2**32."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


@gpu
def _run(pipe, progress: Progress | None, seeds: list[int], **kwargs) -> list[Image.Image]:
    """Call a pipeline with one generator per picture; report every denoising step to ``progress``."""
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]  # on the CPU: the same noise on every device

    def step_end(p, i, t, tensors):
        if progress is not None:
            progress(i + 1, max(i + 1, len(p.scheduler.timesteps)))
        return {}

    return list(pipe(generator=generators, callback_on_step_end=step_end, output_type="pil", **kwargs).images)
