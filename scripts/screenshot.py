"""Take a screenshot of a running studio tab, for the README: Debian's Chromium driven by Playwright.

    python app.py &  python scripts/screenshot.py --url http://127.0.0.1:7860 --out assets/screenshots/data-tab.png
    python scripts/screenshot.py --tab compose --out assets/screenshots/compose-tab.png
    python scripts/screenshot.py --tab sweep --out assets/screenshots/sweep-tab.png
    python scripts/screenshot.py --tab train --out assets/screenshots/train-tab.png

``--tab compose`` first drops the pictures of a bundled example character (``assets/examples``) on
the Compose tab, as a user would drag them from a file manager, waits for their cards, writes a
prompt and generates; the screenshot shows the cards and the pictures. The tests drive the studio
with the same helpers (``tests/studio/test_browser.py``).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
GENERATE_TIMEOUT = 600_000  # ms: 20 steps of the demo family on a loaded CPU

# Drag-and-drop as the browser sends it from a file manager: one DataTransfer holding the files,
# dispatched as dragenter, dragover, drop on the drop zone (Playwright cannot drag files from outside).
_DROP_JS = """(zone, files) => {
    const transfer = new DataTransfer();
    for (const f of files) {
        const bytes = Uint8Array.from(atob(f.data), c => c.charCodeAt(0));
        transfer.items.add(new File([bytes], f.name, {type: f.type}));
    }
    for (const type of ["dragenter", "dragover", "drop"])
        zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
}"""


def launch_chromium(pw, executable: str | None = None):
    """Headless Debian Chromium (``CHROMIUM`` or /usr/bin/chromium): Playwright's own browser download is not used."""
    path = executable or os.environ.get("CHROMIUM", "/usr/bin/chromium")
    return pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)


def drop_files(zone, paths: list[str | os.PathLike]) -> None:
    """Drop the files ``paths`` on the element ``zone`` (a Playwright locator) by a dispatched drop event."""
    files = [{"name": Path(p).name, "type": mimetypes.guess_type(str(p))[0] or "application/octet-stream",
              "data": base64.b64encode(Path(p).read_bytes()).decode()} for p in paths]
    zone.evaluate(_DROP_JS, files)


def example_references(character: str) -> list[tuple[Path, str]]:
    """(picture, concept) of a bundled example character, as its ``character.json`` lists them."""
    meta = json.loads((EXAMPLES / character / "character.json").read_text(encoding="utf-8"))
    return [(EXAMPLES / character / e["file"], e["concept"]) for e in meta["references"]]


def take(card, concept: str) -> bool:
    """Choose ``concept`` in a reference card's "Take" menu; False when the menu cannot be used."""
    menu = card.locator(".reference-concept input")
    if menu.input_value().startswith(concept):  # the labels start with the concept word ("whole picture")
        return True
    if menu.is_disabled():
        return False
    menu.click()
    card.page.get_by_role("option", name=re.compile(rf"^{re.escape(concept)}\b")).click()
    return True


def compose(page, references: list[tuple[Path, str]], prompt: str, seed: int, steps: int | None = None) -> None:
    """On the Compose tab: drop the pictures of ``references``, wait for their cards, take each one's concept,
    write ``prompt``, generate, wait for the pictures."""
    from playwright.sync_api import expect

    drop_files(page.locator("#compose-upload .upload-container"), [picture for picture, _ in references])
    cards = page.locator(".reference-card")
    expect(cards).to_have_count(len(references), timeout=120_000)
    for i, (picture, concept) in enumerate(references):
        if not take(cards.nth(i), concept):
            print(f"screenshot: the Take menu of {picture.name} is disabled; it keeps the studio's default",
                  file=sys.stderr)
    page.locator("#compose-prompt textarea").fill(prompt)
    settings = {"#compose-seed input": seed, "#compose-steps input[type=number]": steps}
    for selector, value in settings.items():
        if value is not None:
            page.locator(selector).fill(str(value))
            page.locator(selector).press("Tab")  # a slider's number box takes its value on blur
    page.locator("#compose-generate").click()
    expect(page.locator("#compose-gallery .thumbnail-item img").first).to_be_visible(timeout=GENERATE_TIMEOUT)


def sweep(page, guidance: str, scales: str, seeds: int, steps: int | None = None) -> None:
    """On the Sweep tab (after ``compose``): sweep ``guidance`` x ``scales``, wait for the last cell."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Sweep").click()
    page.locator("#sweep-guidance textarea").fill(guidance)
    page.locator("#sweep-scales textarea").fill(scales)
    for selector, value in {"#sweep-seeds input[type=number]": seeds, "#sweep-steps input[type=number]": steps}.items():
        if value is not None:
            page.locator(selector).fill(str(value))
            page.locator(selector).press("Tab")
    page.locator("#sweep-run").click()
    expect(page.locator("#sweep-status")).to_contain_text("Done:", timeout=GENERATE_TIMEOUT)


def train(page, steps: int, batch_size: int, every: int) -> None:
    """On the Train tab: launch a RetriNet run on the studio's data set and wait until it has finished."""
    from playwright.sync_api import expect

    expect(page.locator("#train-data input")).not_to_have_value("", timeout=120_000)
    for selector, value in {"#train-steps input": steps, "#train-batch-size input": batch_size,
                            "#train-checkpoint-every input": every, "#train-validation-every input": every}.items():
        page.locator(selector).fill(str(value))
        page.locator(selector).press("Tab")
    page.locator("#train-launch").click()
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=3_600_000)
    page.wait_for_timeout(5000)  # two redraws of the tab's timer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--out", required=True)
    p.add_argument("--tab", default="Data",
                   help="the tab to click before the screenshot; 'compose' also drops an example and generates, "
                        "'sweep' then sweeps --guidance x --scales, 'train' launches a run of --train-steps")
    p.add_argument("--wait-for", default=None,
                   help="a selector that must be visible first (default: text=similar on the Data tab)")
    p.add_argument("--next", type=int, default=0, help="click the Next button this many times first")
    p.add_argument("--character", default="kimara_samasa", help="compose: the example character to drop")
    p.add_argument("--prompt", default="1girl, cowboy_shot, smiling", help="compose: the prompt")
    p.add_argument("--seed", type=int, default=0, help="compose: the seed, so that the picture can be made again")
    p.add_argument("--steps", type=int, default=None, help="compose: denoising steps (default: the tab's)")
    p.add_argument("--guidance", default="3, 5, 7", help="sweep: guidance values")
    p.add_argument("--scales", default="0.5, 1, 1.5", help="sweep: retrieval scale values")
    p.add_argument("--seeds", type=int, default=2, help="sweep: pictures per cell")
    p.add_argument("--train-steps", type=int, default=40, help="train: steps of the run")
    p.add_argument("--train-batch-size", type=int, default=4, help="train: batch size")
    p.add_argument("--train-every", type=int, default=10, help="train: checkpoint and validation interval")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=1300)
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw, args.chromium)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.url)
        tab = args.tab.lower()
        page.get_by_role("tab", name="Compose" if tab == "sweep" else args.tab).click()
        if tab in ("compose", "sweep"):
            compose(page, example_references(args.character), args.prompt, args.seed, args.steps)
        if tab == "sweep":
            sweep(page, args.guidance, args.scales, args.seeds, args.steps)
        if tab == "train":
            train(page, args.train_steps, args.train_batch_size, args.train_every)
        wait_for = args.wait_for or ("text=similar" if args.tab.lower() == "data" else None)
        if wait_for:
            page.wait_for_selector(wait_for)
        for _ in range(args.next):
            page.get_by_role("button", name="Next").click()
            page.wait_for_timeout(400)
        page.wait_for_function("document.querySelectorAll('.progress-text, .eta-bar').length === 0", timeout=60_000)
        page.wait_for_timeout(1000)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(parse_args())
