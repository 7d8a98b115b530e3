"""Take a screenshot of a running studio tab, for the README: Debian's Chromium driven by Playwright.

    python app.py &  python scripts/screenshot.py --url http://127.0.0.1:7860 --out assets/screenshots/data-tab.png
"""

from __future__ import annotations

import argparse
import os

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--out", required=True)
    p.add_argument("--tab", default="Data", help="the tab to click before the screenshot")
    p.add_argument("--wait-for", default="text=similar", help="a selector that must be visible first")
    p.add_argument("--next", type=int, default=0, help="click the Next button this many times first")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=1300)
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(args.url)
        page.get_by_role("tab", name=args.tab).click()
        page.wait_for_selector(args.wait_for)
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
