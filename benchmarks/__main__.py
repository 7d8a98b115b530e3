"""Run the benchmark suite and rewrite BENCHMARKS.md.

    python -m benchmarks                      # every benchmark, the published sizes (tens of minutes)
    python -m benchmarks --quick              # the small sizes CI runs (a few minutes)
    python -m benchmarks --only sweep,studio  # some; the other sections keep what the file holds
    python -m benchmarks --skip training      # all but some
    python -m benchmarks --quick --out /tmp/B.md   # write elsewhere (CI does, the repository's file stays)
    python -m benchmarks --json R.json ... ; python -m benchmarks --render R.json   # sections again from results

Each benchmark module (``benchmarks/NAME.py``, also runnable alone as ``python -m benchmarks.NAME``)
has ``bench(quick) -> dict`` (its figures, with ``summary`` lines: figure, value, goal or anchor, met,
why) and ``section(result) -> str`` (its Markdown). The file is made of one block per benchmark,
between ``<!-- benchmark:NAME ... -->`` and ``<!-- /benchmark:NAME -->`` markers that also carry the
block's summary lines, so a benchmark that is not rerun keeps its section and its lines in the table
of figures at the top; hand-written notes live in ``<!-- notes:NAME -->`` blocks and are kept as they are.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import common

BENCHMARKS = ("data", "retrinet_step", "sweep", "optimise", "concepts", "cluster", "metrics", "compose", "training",
              "studio", "memory")
# hand-written blocks, placed after the benchmark they follow
NOTES_AFTER = {"cluster": "builder", "compose": "demo-training", "memory": "ci"}
DEFAULT_NOTES = {
    "builder": """## Dataset builder

On a 400-picture Toybooru (seed 55) given only pictures and tags, with the demo detector and the colour stand-in
(`tests/training/test_build_dataset.py`): asked for three colours, 149 pictures kept (37.2 %; RetriBooru kept
116,729 of 599,192, 19.5 %) in 62 clusters of purity 0.966; asked the paper's two colours, 240 kept (60.0 %) at
purity 0.942.""",
    "demo-training": """## The demo family's training

Training on the build machine (`assets/demo-zoo/manifest.json`, train seconds from each run's `metrics.jsonl`;
stages ran side by side on the 2 cores, so these overlap):

| stage | steps x batch | train time |
|---|---|---|
| VAE (64 px -> 16x16x4) | 1000 x 32 | 28 min |
| CLIP | 400 x 128 | 17 min |
| base UNet, 1.5 M parameters | 1200 x 64 | 41 min (30 samples/s on one thread) |
| RetriNet -b / -a, N = 4 | 600 x 16 each | 21 min each |
| Semantica | 300 x 32 | 14 min |
| judge | 1500 x 64 | 14 min |""",
    "ci": """## CI

`bash .ci/run` in a fresh clone: see the closing notes of the issues for the latest wall time; most of it is the
install of torch's CUDA build from the machine's disk. `tests/benchmarks/test_suite.py` runs
`python -m benchmarks --quick` into a temporary file (each benchmark runs and reports its fields; the figures are
not asserted).""",
}
BLOCK = re.compile(r"<!-- (benchmark|notes):([\w-]+)(?: summary=(.*?))? -->\n(.*?)\n<!-- /\1:\2 -->", re.DOTALL)
INTRO = """# Benchmarks

Written by `python -m benchmarks` (each section by its own `python -m benchmarks.NAME`). This machine is shared:
a training job and other people's tests run beside the benchmarks, so every timing figure that can be is a ratio
of two things measured in the same run, their repetitions interleaved and the median of the paired ratios kept;
absolute times are given with the load average at the start of their section. The suite runs with
`OMP_WAIT_POLICY=PASSIVE` unless the caller sets a policy (see "Optimisations": on a shared CPU OpenMP's default
spinning makes 2 threads many times slower than 1, which would drown every other figure)."""


def _encode(rows: list[dict[str, Any]]) -> str:
    # JSON inside an HTML comment: "--" may not appear there, and only strings can hold it
    return json.dumps(rows, ensure_ascii=False).replace("--", "-\\u002d")


def read_blocks(path: Path) -> dict[tuple[str, str], tuple[list[dict[str, Any]], str]]:
    if not path.is_file():
        return {}
    out = {}
    for kind, name, summary, body in BLOCK.findall(path.read_text(encoding="utf-8")):
        out[(kind, name)] = (json.loads(summary) if summary else [], body)
    return out


def _mark(met) -> str:
    return {True: "met", False: "**missed**", None: "-"}[met]


def compose_file(blocks: dict[tuple[str, str], tuple[list[dict[str, Any]], str]], run_machine: dict[str, Any],
                 quick: bool) -> str:
    rows = []
    for name in BENCHMARKS:
        for s in blocks.get(("benchmark", name), ([], ""))[0]:
            rows.append([s["figure"], s["value"], s["goal"], _mark(s.get("met")), s.get("why") or ""])
    parts = [INTRO, "",
             (f"Last written {run_machine['date']} on {run_machine['cpu']} ({run_machine['cores']} cores), torch "
              f"{run_machine['torch']}{' in **quick mode** (CI sizes: not the published figures)' if quick else ''}."),
             "", "## Figures against their goals", "",
             common.table(["figure", "value", "goal or anchor", "met?", "why it misses / note"], rows)]
    for name in BENCHMARKS:
        summary, body = blocks.get(("benchmark", name), ([], (f"## {name}\n\nNot measured yet: run "
                                                              f"`python -m benchmarks.{name}`.")))
        parts += ["", f"<!-- benchmark:{name} summary={_encode(summary)} -->", body, f"<!-- /benchmark:{name} -->"]
        note = NOTES_AFTER.get(name)
        if note:
            body = blocks.get(("notes", note), ([], DEFAULT_NOTES[note]))[1]
            parts += ["", f"<!-- notes:{note} -->", body, f"<!-- /notes:{note} -->"]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small sizes CI runs (under 5 minutes)")
    p.add_argument("--only", default=None, help=f"comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)}")
    p.add_argument("--skip", default=None, help="comma-separated benchmarks not to run")
    p.add_argument("--out", default=str(common.ROOT / "BENCHMARKS.md"),
                   help="the file to (re)write (default: the repository's BENCHMARKS.md)")
    p.add_argument("--base", default=None, help="the file whose sections are kept for benchmarks not run "
                   "(default: --out if it exists, else the repository's BENCHMARKS.md)")
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="run nothing: rewrite the chosen sections from the results a --json run saved")
    args = p.parse_args(argv)
    for opt in ("only", "skip"):
        names = [n.strip() for n in (getattr(args, opt) or "").split(",") if n.strip()]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            p.error(f"--{opt}: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        setattr(args, opt, names)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    base = Path(args.base) if args.base else (out if out.is_file() else common.ROOT / "BENCHMARKS.md")
    blocks = read_blocks(base)
    chosen = [n for n in BENCHMARKS if (not args.only or n in args.only) and n not in args.skip]
    results: dict[str, Any] = {}
    failed = []
    t_start = time.perf_counter()
    run_machine = common.machine()
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        if args.render:
            saved = json.loads(Path(args.render).read_text(encoding="utf-8")).get(name)
            if saved and "error" not in saved:
                blocks[("benchmark", name)] = (saved["summary"], module.section(saved))
                results[name] = saved
            continue
        try:
            kwargs = {"previous": results} if "previous" in inspect.signature(module.bench).parameters else {}
            result = common.run(module.bench, quick=args.quick, **kwargs)
            body = module.section(result)
            blocks[("benchmark", name)] = (result["summary"], body)
            results[name] = result
            print(f"[benchmarks] {name}: {result['seconds']:.0f} s", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - one benchmark failing must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            err = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            blocks[("benchmark", name)] = (
                [common.summary(f"{name} benchmark", "failed", "runs", False, err)],
                (f"## {getattr(module, 'TITLE', name)}\n\n`python -m benchmarks.{name}` **failed** "
                 f"({run_machine['date']}): `{err}`"))
            results[name] = {"error": err}
        gc.collect()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")  # written after every benchmark: a long run keeps what it has
        tmp.write_text(compose_file(blocks, run_machine, args.quick), encoding="utf-8")
        tmp.replace(out)
    if not chosen or args.render:
        quick = args.quick or any(r.get("quick") for r in results.values())
        out.write_text(compose_file(blocks, run_machine, quick), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    total = time.perf_counter() - t_start
    print(f"[benchmarks] {len(chosen) - len(failed)} of {len(chosen)} {'rendered' if args.render else 'ran'} in "
          f"{total:.0f} s; wrote {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
