"""Build a RetriBooru-style data set from a folder of character pictures (seed 002, A.1).

    python -m training.build_dataset --images DIR --metadata FILE --out DIR [--vqa colors|MODEL]
        [--questions Q ...] [--detector DIR] [--segmenter sam_vit_b:CHECKPOINT]

The paper's steps:

1. **filter**: unwanted tags (monochrome, sketch, ...), not exactly one character tag, no cloth
   tag, unreadable pictures, missing metadata fields, duplicate ids; every drop is counted;
2. **vision annotations**: head box and figure mask by ``pipelines.concepts.ConceptExtractor``
   (the demo detector by default); a picture with no head is dropped ("no_head");
3. **clothing identity**: a VQA model answers "List top two colors of the character's clothes"
   (the offline ``ColorAnswerer`` by default, InstructBLIP with ``--vqa MODEL``);
4. **clustering**: pictures of the same (character, artist) whose normalised answers are equal, in
   order, form a cluster (Algorithm 1's pairwise loop, done by grouping in O(N)); a picture whose
   cluster has no other member is dropped ("no_match"), as the paper's heuristic drops ~80 %;
5. **writing** the schema of ``training.data.toybooru`` (images/, masks/, annotations.jsonl with
   ``similar``) and ``report.json`` + ``report.png`` (counts by reason, ``similar`` lengths, top
   characters, top cloth tags, like the paper's Fig. 2).

Steps 1-3 run in shards of ``--shard-size`` records whose results are written atomically under
``OUT/.work/``: run the command again after a crash and it continues where it stopped (a shard's
temporary file left by the crash is removed). The data set is assembled in ``.OUT.tmp-build`` and
moved into ``OUT`` with ``annotations.jsonl`` last: an ``OUT/annotations.jsonl`` means a complete build.
``--num-shards K --shard-index I`` (or ``accelerate launch --num_processes K``) splits the shards
between processes; the main process (or a last run without shard options) merges.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.detector import DEMO_DETECTOR
from training.data.vqa import CLOTHES_QUESTION, ColorAnswerer, normalise_answer
from training.files import write_text

UNWANTED_TAGS = ("monochrome", "greyscale", "sketch", "comic", "lineart", "multiple_girls", "multiple_boys")
# garment words: a tag that names one (alone or as its last word) counts as a cloth tag (RetriBooru
# scraped 1,298 cloth tags from Danbooru and dropped shoes and accessories)
CLOTH_WORDS = ("dress", "shirt", "skirt", "hoodie", "shorts", "kimono", "jacket", "coat", "sweater", "uniform",
               "pants", "blouse", "vest", "apron", "robe", "suit", "leotard", "swimsuit", "bikini", "overalls",
               "cardigan", "serafuku", "sash", "obi", "pajamas", "gown", "cape", "cloak")


# ---------------------------------------------------------------------- metadata

def _tags(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [t if isinstance(t, str) else t.get("name", "") for t in value]


def normalise_record(raw: dict[str, Any]) -> dict[str, Any]:
    """Our shape (``id``, ``file``, ``tags``, ``character``, ``artist``) from ours or Danbooru's
    (``tag_string_general`` / ``_character`` / ``_artist``, or ``tags`` as {name, category})."""
    rid = raw.get("id")
    file = raw.get("file") or raw.get("file_name") or raw.get("filename")
    if file is None and rid is not None and raw.get("file_ext"):
        file = f"{rid}.{raw['file_ext']}"
    general, characters, artists = [], [], []
    if "tag_string_general" in raw or "tag_string_character" in raw:
        general = _tags(raw.get("tag_string_general"))
        characters = _tags(raw.get("tag_string_character"))
        artists = _tags(raw.get("tag_string_artist"))
    elif raw.get("tags") and isinstance(raw["tags"][0], dict):
        by = defaultdict(list)
        for t in raw["tags"]:
            by[str(t.get("category"))].append(t.get("name", ""))
        general, characters, artists = by["0"], by["4"], by["1"]
    else:
        general = _tags(raw.get("tags"))
        characters = _tags(raw.get("characters")) or ([raw["character"]] if raw.get("character") else [])
        artists = _tags(raw.get("artists")) or ([raw["artist"]] if raw.get("artist") else [])
    return {"id": None if rid is None else str(rid), "file": file, "tags": general, "characters": characters,
            "artists": artists}


def read_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """JSON (a list, or {"posts": [...]}) or JSONL records; broken lines come back as ``None``."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("posts") or data.get("records") or list(data.values())
        return [r if isinstance(r, dict) else None for r in data]
    except json.JSONDecodeError:
        out = []
        for line in text.splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                    out.append(r if isinstance(r, dict) else None)
                except json.JSONDecodeError:
                    out.append(None)
        return out


def is_cloth_tag(tag: str, words: Iterable[str] = CLOTH_WORDS) -> bool:
    last = tag.lower().split("_")[-1]
    return last in set(words)


def filter_records(raw: list[dict | None], images: Path, unwanted=UNWANTED_TAGS,
                   cloth_words=CLOTH_WORDS) -> tuple[list[dict[str, Any]], Counter]:
    """Step 1 without opening pictures: the records worth annotating, and the drops by reason."""
    kept, dropped, seen = [], Counter(), set()
    for r in raw:
        if r is None:
            dropped["broken_metadata"] += 1
            continue
        rec = normalise_record(r)
        if rec["id"] is None or rec["file"] is None:
            dropped["missing_field"] += 1
        elif rec["id"] in seen:
            dropped["duplicate_id"] += 1
        elif set(rec["tags"]) & set(unwanted):
            dropped["unwanted_tag"] += 1
        elif len(rec["characters"]) != 1:
            dropped["not_one_character"] += 1
        elif not any(is_cloth_tag(t, cloth_words) for t in rec["tags"]):
            dropped["no_cloth_tag"] += 1
        elif not (images / rec["file"]).is_file():
            dropped["missing_file"] += 1
        else:
            seen.add(rec["id"])
            rec["character"] = rec["characters"][0]
            rec["artist"] = rec["artists"][0] if rec["artists"] else "unknown_artist"
            kept.append(rec)
    return sorted(kept, key=lambda x: x["id"]), dropped


# ---------------------------------------------------------------------- clustering

def cluster_key(rec: dict[str, Any]) -> tuple:
    return rec["character"], rec["artist"], tuple(normalise_answer(a) for a in rec["answers"])


def cluster(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Algorithm 1 in O(N): ``id -> similar ids``, grouping on (character, artist, answers)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for r in records:
        groups[cluster_key(r)].append(r["id"])
    return {i: [j for j in members if j != i] for members in groups.values() for i in members}


def cluster_pairwise(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Algorithm 1 as printed (seed 002): per (character, artist) group, compare every pair."""
    d0: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        d0[(r["character"], r["artist"])].append(r)
    out = {}
    for xs in d0.values():
        similar = [[] for _ in xs]
        for i in range(len(xs)):
            for j in range(len(xs)):
                if i != j and [normalise_answer(a) for a in xs[i]["answers"]] == \
                        [normalise_answer(a) for a in xs[j]["answers"]]:
                    similar[i].append(xs[j]["id"])
        for i, x in enumerate(xs):
            out[x["id"]] = similar[i]
    return out


# ---------------------------------------------------------------------- shards

def annotate_shard(records: list[dict[str, Any]], images: Path, work: Path, extractor, answerer,
                   questions: list[str]) -> list[dict[str, Any]]:
    """Steps 2-3 for one shard; masks go to ``work/masks``; returns one result per record."""
    out = []
    for rec in records:
        res = {"id": rec["id"]}
        try:
            with Image.open(images / rec["file"]) as im:
                im.load()
                crops = extractor.extract(im)
        except (OSError, ValueError, SyntaxError) as e:
            out.append({**res, "drop": "unreadable", "error": str(e)[:200]})
            continue
        if crops.head_box is None:
            out.append({**res, "drop": "no_head"})
            continue
        clothes = crops.clothes  # RGBA: the extractor fills the background with transparency
        answers = answerer.answer(clothes, questions, face=crops.face) if isinstance(answerer, ColorAnswerer) \
            else answerer.answer(crops.image, questions)
        if any(normalise_answer(a) in ("", "unknown") for a in answers):
            out.append({**res, "drop": "no_answer"})
            continue
        crops.mask.save(work / "masks" / f"{_safe(rec['id'])}.png")
        out.append({**res, "head_box": list(crops.head_box), "size": list(crops.image.size), "answers": answers})
    return out


def _safe(rid: str) -> str:
    return rid if rid.replace("_", "").replace("-", "").isalnum() else hashlib.sha1(rid.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.build_dataset", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder the metadata's file names are relative to")
    p.add_argument("--metadata", required=True, help="JSON or JSONL records (ours or Danbooru's shape)")
    p.add_argument("--out", required=True)
    p.add_argument("--vqa", default="colors", help="'colors' (offline stand-in) or an InstructBLIP / BLIP-2 id")
    p.add_argument("--questions", nargs="+", default=[CLOTHES_QUESTION])
    p.add_argument("--detector", default=str(DEMO_DETECTOR), help="a detector folder (pipelines.detector)")
    p.add_argument("--segmenter", default=None, help="sam_vit_b:CHECKPOINT (default: the detector's masks)")
    p.add_argument("--unwanted-tags", nargs="*", default=list(UNWANTED_TAGS))
    p.add_argument("--cloth-words", nargs="*", default=list(CLOTH_WORDS))
    p.add_argument("--test-share", type=float, default=0.1, help="share of characters put in the test split")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--num-shards", type=int, default=None, help="split the shards between this many processes")
    p.add_argument("--shard-index", type=int, default=None, help="which of them this process is")
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error("--shard-size must be at least 1")
    if (args.num_shards is None) != (args.shard_index is None):
        p.error("--num-shards and --shard-index go together")
    if args.num_shards is not None and not 0 <= args.shard_index < args.num_shards:
        p.error("--shard-index must be in 0 .. --num-shards - 1")
    return args


def build_extractor(args):
    from pipelines.concepts import ConceptExtractor

    segmenter = None
    if args.segmenter:
        from pipelines.detector import SamSegmenter

        kind, _, checkpoint = args.segmenter.partition(":")
        if not kind.startswith("sam_"):
            raise ValueError(f"--segmenter {args.segmenter!r}: expected sam_vit_b|sam_vit_l|sam_vit_h:CHECKPOINT")
        segmenter = SamSegmenter.from_checkpoint(kind[4:], checkpoint or None)
    return ConceptExtractor.from_pretrained(args.detector, segmenter=segmenter, fill="transparent")


def build_answerer(args):
    if args.vqa == "colors":
        return ColorAnswerer()
    from training.data.vqa import InstructBlipAnswerer

    return InstructBlipAnswerer.from_pretrained(args.vqa)


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    images, out = Path(args.images), Path(args.out)
    if not images.is_dir():
        raise ValueError(f"--images {images} is not a folder")
    if not Path(args.metadata).is_file():
        raise ValueError(f"--metadata {args.metadata} is not a file")
    raw = read_metadata(args.metadata)
    records, dropped = filter_records(raw, images, args.unwanted_tags, args.cloth_words)
    work = out / ".work"
    (work / "masks").mkdir(parents=True, exist_ok=True)
    shards = [records[i:i + args.shard_size] for i in range(0, len(records), args.shard_size)]
    manifest = {"records": [r["id"] for r in records], "shard_size": args.shard_size, "questions": args.questions,
                "vqa": args.vqa, "detector": str(args.detector)}
    digest = hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    mpath = work / "manifest.json"
    if mpath.exists() and json.loads(mpath.read_text()).get("digest") != digest:
        raise ValueError(f"{out} holds a build of other inputs or options; use another --out or delete it")
    if not mpath.exists():
        write_text(mpath, json.dumps({"digest": digest, "num_shards": len(shards)}))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.num_shards is not None:
        world, rank = args.num_shards, args.shard_index
    mine = [i for i in range(len(shards)) if i % world == rank]
    for i in mine:  # a crash between writing a shard's temporary file and renaming it leaves the file
        for stale in work.glob(f".shard-{i:06d}.jsonl.*"):
            stale.unlink(missing_ok=True)
    todo = [i for i in mine if not (work / f"shard-{i:06d}.jsonl").exists()]
    if todo:
        extractor, answerer = build_extractor(args), build_answerer(args)
        for i in todo:
            results = annotate_shard(shards[i], images, work, extractor, answerer, args.questions)
            write_text(work / f"shard-{i:06d}.jsonl", "".join(json.dumps(r) + "\n" for r in results))
            print(f"shard {i + 1} of {len(shards)} done", flush=True)
    if args.num_shards is not None or (world > 1 and rank != 0):
        return None  # another run (or the main process) merges
    if world > 1:
        import time

        while not all((work / f"shard-{i:06d}.jsonl").exists() for i in range(len(shards))):
            time.sleep(1)
    return merge(len(raw), records, dropped, shards, images, out, args)


def merge(total: int, records, dropped: Counter, shards, images: Path, out: Path, args) -> dict[str, Any]:
    """Steps 4-5: cluster the annotated records and write the data set and its report."""
    work = out / ".work"
    missing = [i for i in range(len(shards)) if not (work / f"shard-{i:06d}.jsonl").exists()]
    if missing:
        raise ValueError(f"{len(missing)} shards are not annotated yet (first: {missing[0]}); run without shard options")
    results = {}
    for i in range(len(shards)):
        for line in (work / f"shard-{i:06d}.jsonl").read_text().splitlines():
            r = json.loads(line)
            results[r["id"]] = r
    annotated = []
    for rec in records:
        res = results[rec["id"]]
        if "drop" in res:
            dropped[res["drop"]] += 1
        else:
            annotated.append({**rec, **res})
    similar = cluster(annotated)
    kept = [r for r in annotated if similar[r["id"]]]
    dropped["no_match"] += len(annotated) - len(kept)
    test_chars = {c for c in {r["character"] for r in kept}
                  if int(hashlib.sha1(c.encode()).hexdigest(), 16) % 1000 < args.test_share * 1000}

    final = out.with_name(f".{out.name}.tmp-build")
    shutil.rmtree(final, ignore_errors=True)
    (final / "images").mkdir(parents=True)
    (final / "masks").mkdir()
    clusters = {}
    lines = []
    for r in kept:
        key = cluster_key(r)
        cid = clusters.setdefault(key, f"cluster{len(clusters):06d}")
        name = _safe(r["id"])
        ext = Path(r["file"]).suffix.lower() or ".png"
        shutil.copyfile(images / r["file"], final / "images" / f"{name}{ext}")
        shutil.copyfile(work / "masks" / f"{name}.png", final / "masks" / f"{name}.png")
        w, h = r["size"]
        lines.append(json.dumps({
            "id": r["id"], "file": f"images/{name}{ext}", "mask_file": f"masks/{name}.png", "width": w, "height": h,
            "split": "test" if r["character"] in test_chars else "train", "character": r["character"],
            "artist": r["artist"], "outfit": f"{r['character']}/{cid}", "cluster": cid, "tags": r["tags"],
            "cloth_tags": [t for t in r["tags"] if is_cloth_tag(t, args.cloth_words)], "face_bbox": r["head_box"],
            "similar": similar[r["id"]], "vqa": r["answers"]}) + "\n")
    (final / "annotations.jsonl").write_text("".join(lines), encoding="utf-8")
    report = {
        "input_records": total,
        "kept": len(kept), "dropped": dict(sorted(dropped.items())), "clusters": len(clusters),
        "similar_lengths": dict(sorted(Counter(len(similar[r["id"]]) for r in kept).items())),
        "top_characters": Counter(r["character"] for r in kept).most_common(15),
        "top_cloth_tags": Counter(t for r in kept for t in r["tags"] if is_cloth_tag(t, args.cloth_words)).most_common(30),
        "paper_kept_share": round(116_729 / 599_192, 4),
    }
    report["kept_share"] = round(report["kept"] / max(1, report["input_records"]), 4)
    (final / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    _plot(report, final / "report.png")
    # annotations.jsonl marks a complete build: the old one goes first, the new one comes last, so a
    # crash in between leaves no annotations.jsonl beside missing or mixed pictures
    (out / "annotations.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)
    shutil.rmtree(out / "masks", ignore_errors=True)
    for p in sorted(final.iterdir(), key=lambda q: q.name == "annotations.jsonl"):
        os.replace(p, out / p.name)
    final.rmdir()
    for stale in work.glob(".*"):  # temporary files of crashed writes (every shard is in place now)
        if stale.is_file():
            stale.unlink(missing_ok=True)
    print(f"kept {report['kept']} of {report['input_records']} pictures ({report['kept_share']:.1%}; "
          f"the paper kept {report['paper_kept_share']:.1%}) in {report['clusters']} clusters")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lengths = report["similar_lengths"]
    axes[0].bar([int(k) for k in lengths], list(lengths.values()))
    axes[0].set_title("length of 'similar'")
    for ax, key, title in ((axes[1], "top_characters", "top characters"), (axes[2], "top_cloth_tags", "top cloth tags")):
        names, counts = zip(*report[key]) if report[key] else ((), ())
        ax.barh(list(names)[::-1], list(counts)[::-1])
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as e:
        sys.exit(f"error: {e}")
