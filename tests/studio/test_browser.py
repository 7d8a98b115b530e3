"""The studio in a real browser: Playwright drives Debian's Chromium against the studio on the tiny family.

What a user does: open the page, add references by the file chooser and by drag-and-drop, see
their crops, generate, make variations. Each test leaves a screenshot in ``$TEST_ARTIFACTS``
(default: ``test-artifacts/`` in the repository), taken whether the test passed or not.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-test.txt)")

from helpers import serve, upright_pictures
from playwright.sync_api import expect, sync_playwright

from scripts.screenshot import drop_files, launch_chromium, take
from studio.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), "/usr/bin/chromium") if p and os.path.isfile(p)), None)
if CHROMIUM is None:
    pytest.skip("no Chromium: neither $CHROMIUM nor /usr/bin/chromium exists (`apt-get install chromium`; "
                ".ci/run installs it)", allow_module_level=True)

LOAD = 60_000  # ms: the page and its small events, on a CPU busy with other work
WORK = 120_000  # ms: cutting references, generating
SEP = " · "  # between the parts of a picture's caption (``Picture.caption``)



@pytest.fixture(scope="module")
def studio_url(tiny_models, toybooru, tmp_path_factory):
    """The studio on the tiny family, served on a free port for the module."""
    engine = Engine(data=str(toybooru), models=tiny_models, workspace=tmp_path_factory.mktemp("workspace"))
    with serve(engine) as url:
        yield url


@pytest.fixture(scope="module")
def train_workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("train-workspace")


@pytest.fixture(scope="module")
def train_studio_url(tiny_zoo_spec, toybooru, train_workspace):
    """A studio of its own for training: using a checkpoint changes the models of its engine."""
    from pipelines.zoo import ModelZoo

    engine = Engine(data=str(toybooru), models=ModelZoo(tiny_zoo_spec, device="cpu"), workspace=train_workspace)
    with serve(engine) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        browser = launch_chromium(pw, CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, studio_url, artifacts, request):
    """A fresh page (its own Gradio session) on the studio; its screenshot is saved when the test ends."""
    context = browser.new_context(viewport={"width": 1280, "height": 1300})
    page = context.new_page()
    page.set_default_timeout(LOAD)
    page.goto(studio_url)
    expect(page.get_by_role("tab", name="Compose")).to_be_visible(timeout=LOAD)
    yield page
    try:
        page.screenshot(path=artifacts / f"browser-{request.node.name}.png", full_page=True)
    finally:
        context.close()


@pytest.fixture(scope="module")
def pictures(toybooru, toybooru_records) -> list[str]:
    """Three Toybooru pictures whose head lies in the upper half: each gives face, clothes and figure."""
    return upright_pictures(toybooru, toybooru_records, 3)


def image_size(img) -> tuple[int, int]:
    """The natural size of a shown ``<img>``, once it has loaded (lazy pictures are made to load)."""
    return tuple(img.evaluate("async e => { e.loading = 'eager'; e.scrollIntoView(); await e.decode(); "
                              "return [e.naturalWidth, e.naturalHeight]; }"))


def set_number(page, selector: str, value: float) -> None:
    """Type into a number box (a slider's too); it takes the value when it loses focus."""
    box = page.locator(selector)
    box.fill(str(value))
    box.press("Tab")
    expect(box).to_have_value(str(value))


def test_the_page_opens_on_compose_and_shows_the_three_tabs(page, toybooru_records):
    expect(page).to_have_title("RetriNet Studio")
    expect(page.get_by_role("tab")).to_have_text(["Compose", "Variations", "Sweep", "Train", "Data"])
    expect(page.get_by_role("tab", name="Compose")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#compose-upload")).to_be_visible()
    expect(page.get_by_text("No reference yet")).to_be_visible()

    page.get_by_role("tab", name="Variations").click()
    expect(page.locator("#variations-picture")).to_be_visible()
    expect(page.locator("#variations-run")).to_be_visible()
    page.get_by_role("tab", name="Data").click()  # the Data tab opens the Toybooru it was given
    expect(page.get_by_text(re.compile(rf"^{len(toybooru_records)} pictures \("))).to_be_visible(timeout=WORK)


def test_references_from_the_file_chooser_and_a_drop_become_cards_with_crops(page, pictures):
    zone = page.locator("#compose-upload .upload-container")
    with page.expect_file_chooser() as chooser:
        zone.click()
    assert chooser.value.is_multiple()
    chooser.value.set_files(pictures[:2])
    cards = page.locator(".reference-card")
    expect(cards).to_have_count(2, timeout=WORK)

    drop_files(zone, pictures[2:])
    expect(cards).to_have_count(3, timeout=WORK)
    expect(page.get_by_text("No reference yet")).to_have_count(0)
    # each card: the picture with its head box, its concept crops and mask, the concept taken
    # (alternating face / clothes by position)
    for i, concept in enumerate(["face", "clothes", "face"]):
        card = cards.nth(i)
        expect(card.locator(".reference-concept input")).to_have_value(concept)
        expect(card.get_by_text(f"Reference {i + 1}")).to_be_visible()
        assert image_size(card.locator(".reference-overlay img")) == (96, 96)
        crops = card.locator(".reference-crops .thumbnail-item")
        expect(crops.locator(".caption-label")).to_have_text(["face", "clothes", "figure", "whole picture", "mask"])
        for j in range(5):
            width, height = image_size(crops.nth(j).locator("img"))
            assert 0 < width <= 96 and 0 < height <= 96


def test_generate_shows_the_pictures_with_their_seeds(page, pictures):
    page.locator("#compose-upload input[type=file]").set_input_files(pictures[:2])
    expect(page.locator(".reference-card")).to_have_count(2, timeout=WORK)
    page.locator("#compose-prompt textarea").fill("1girl, smiling")
    set_number(page, "#compose-steps input[type=number]", 2)
    set_number(page, "#compose-num-images input[type=number]", 2)
    set_number(page, "#compose-seed input", 5)
    set_number(page, "#compose-width input", 32)
    set_number(page, "#compose-height input", 32)

    page.locator("#compose-generate").click()
    shown = page.locator("#compose-gallery .thumbnail-item")
    expect(shown).to_have_count(2, timeout=WORK)
    expect(shown.locator(".caption-label")).to_have_text([f"seed 5{SEP}2 steps{SEP}guidance 5{SEP}retrieval 1{SEP}32x32",
                                                          f"seed 6{SEP}2 steps{SEP}guidance 5{SEP}retrieval 1{SEP}32x32"])
    assert [image_size(shown.nth(i).locator("img")) for i in range(2)] == [(32, 32)] * 2
    expect(page.locator("#compose-status")).to_have_text("2 pictures, seeds 5 to 6. Concepts: face, clothes.")


def test_the_concept_a_card_gives_can_be_changed(page, pictures):
    page.locator("#compose-upload input[type=file]").set_input_files(pictures[:2])
    cards = page.locator(".reference-card")
    expect(cards).to_have_count(2, timeout=WORK)
    assert take(cards.nth(0), "whole"), "the Take menu is disabled"
    expect(cards.nth(0).locator(".reference-concept input")).to_have_value("whole picture")
    set_number(page, "#compose-steps input[type=number]", 1)
    set_number(page, "#compose-num-images input[type=number]", 1)
    page.locator("#compose-generate").click()
    expect(page.locator("#compose-status")).to_contain_text("Concepts: whole, clothes.", timeout=WORK)


def test_variations_of_an_uploaded_picture(page, pictures):
    page.get_by_role("tab", name="Variations").click()
    page.locator("#variations-picture input[type=file]").set_input_files(pictures[0])
    assert image_size(page.locator("#variations-picture img")) == (96, 96)
    set_number(page, "#variations-num-images input[type=number]", 3)
    set_number(page, "#variations-steps input[type=number]", 2)
    set_number(page, "#variations-seed input", 3)

    page.locator("#variations-run").click()
    shown = page.locator("#variations-gallery .thumbnail-item")
    expect(shown).to_have_count(3, timeout=WORK)
    expect(shown.locator(".caption-label")).to_have_text([f"seed {s}{SEP}2 steps{SEP}guidance 0.5{SEP}32x32"
                                                          for s in (3, 4, 5)])
    assert [image_size(shown.nth(i).locator("img")) for i in range(3)] == [(32, 32)] * 3


def add_references_and_open_sweep(page, pictures, guidance: str, scales: str, steps: int, seeds: int = 1) -> None:
    page.locator("#compose-upload input[type=file]").set_input_files(pictures[:2])
    expect(page.locator(".reference-card")).to_have_count(2, timeout=WORK)
    page.locator("#compose-prompt textarea").fill("1girl, smiling")
    page.get_by_role("tab", name="Sweep").click()
    page.locator("#sweep-guidance textarea").fill(guidance)
    page.locator("#sweep-scales textarea").fill(scales)
    set_number(page, "#sweep-seeds input[type=number]", seeds)
    set_number(page, "#sweep-steps input[type=number]", steps)


def test_a_2x2_sweep_fills_the_table_and_draws_the_plots(page, pictures):
    add_references_and_open_sweep(page, pictures, "2, 4", "0.5, 1", 2)
    page.locator("#sweep-run").click()
    expect(page.locator("#sweep-status")).to_contain_text("Done: 4 of 4 cells", timeout=WORK)
    grid = page.locator("#sweep-table [role=grid]")
    expect(grid).to_have_attribute("aria-rowcount", "5")  # the header and one row per cell
    expect(grid.locator("tbody tr").filter(has_text="★")).to_have_count(1)
    expect(page.locator("#sweep-gallery .thumbnail-item")).to_have_count(4)
    expect(page.locator("#sweep-gallery .caption-label").first).to_have_text("g 2, s 0.5, seed 0")
    for plot in ("#sweep-swd-plot", "#sweep-clip-plot"):  # matplotlib figures, shown as PNGs
        width, height = image_size(page.locator(f"{plot} img"))
        assert width > 200 and height > 100
    expect(page.locator("#sweep-csv a").first).to_be_visible()


def test_stop_keeps_the_cells_of_a_sweep_that_are_done(page, pictures):
    # cells long enough (8 pictures of 200 steps) that the page sees the first ones well before the last
    add_references_and_open_sweep(page, pictures, "1, 2, 3", "0.5, 1, 1.5", 200, seeds=8)
    page.locator("#sweep-run").click()
    expect(page.locator("#sweep-status")).to_contain_text(re.compile(r"Running: [1-6] of 9 cells"), timeout=WORK)
    page.locator("#sweep-stop").click()
    expect(page.locator("#sweep-status")).to_contain_text("Stopped", timeout=WORK)
    page.wait_for_timeout(3000)  # nothing more arrives
    done = int(page.locator("#sweep-table [role=grid]").get_attribute("aria-rowcount")) - 1
    assert 1 <= done < 9
    expect(page.locator("#sweep-status")).to_contain_text("Stopped")


TRAIN = 240_000  # ms: an `accelerate launch` starts in about 10 s here, more on a busy CPU


def test_train_watch_stop_resume_and_compose_with_the_checkpoint(browser, train_studio_url, train_workspace, pictures,
                                                                  artifacts):
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(LOAD)
    try:
        page.goto(train_studio_url)
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#train-data input")).not_to_have_value("", timeout=WORK)  # the studio's data set
        set_number(page, "#train-steps input", 1000)
        set_number(page, "#train-checkpoint-every input", 2)
        set_number(page, "#train-validation-every input", 0)
        set_number(page, "#train-batch-size input", 2)
        set_number(page, "#train-resolution input", 32)
        page.locator("#train-run-name textarea, #train-run-name input").first.fill("browser-run")
        page.locator("#train-launch").click()

        status = page.locator("#train-status")
        expect(status).to_contain_text("running", timeout=WORK)
        # the loss plot draws the losses of metrics.jsonl as they come; the log tail fills
        expect(page.locator("#train-loss-plot canvas, #train-loss-plot svg").first).to_be_visible(timeout=TRAIN)
        expect(page.locator("#train-log textarea")).to_have_value(re.compile(r"saved \S+checkpoint-\d+"), timeout=TRAIN)
        expect(status).to_contain_text(re.compile(r"step [1-9]\d* of 1000"), timeout=TRAIN)
        page.locator("#train-checkpoint input").click()
        expect(page.get_by_role("option", name=re.compile(r"^checkpoint-\d+$")).first).to_be_visible(timeout=TRAIN)
        page.keyboard.press("Escape")

        page.locator("#train-stop").click()
        expect(status).to_contain_text("stopped", timeout=TRAIN)
        page.locator("#train-resume").click()
        expect(status).to_contain_text("running", timeout=WORK)
        expect(status).to_contain_text("attempt 2", timeout=WORK)
        # the second attempt resumes from a checkpoint. The log box shows the last 40 lines, and at this tiny model's
        # speed (8 lines a checkpoint, one every 2 steps) the line that says so can scroll out of it within a second,
        # between two refreshes of the page: it is read from the job's log file
        resumed = re.compile(r"resumed from \S*checkpoint-\d+ at step [1-9]")

        def logged_resume() -> bool:
            return any(resumed.search(f.read_text(errors="replace")) for f in train_workspace.rglob("log.txt"))

        deadline = time.monotonic() + TRAIN / 1000
        while not logged_resume() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert logged_resume(), "the second attempt's log never said it resumed from a checkpoint"
        expect(page.locator("#train-log textarea")).to_have_value(re.compile(r"checkpoint-\d+"), timeout=TRAIN)
        page.locator("#train-stop").click()
        expect(status).to_contain_text("stopped", timeout=TRAIN)

        page.locator("#train-use").click()  # the latest checkpoint, in Compose
        expect(page.locator("#train-used")).to_contain_text("Compose now uses checkpoint-", timeout=TRAIN)

        page.get_by_role("tab", name="Compose").click()
        page.locator("#compose-upload input[type=file]").set_input_files(pictures[:2])
        expect(page.locator(".reference-card")).to_have_count(2, timeout=WORK)
        set_number(page, "#compose-steps input[type=number]", 2)
        set_number(page, "#compose-num-images input[type=number]", 1)
        page.locator("#compose-generate").click()
        expect(page.locator("#compose-gallery .thumbnail-item")).to_have_count(1, timeout=WORK)
        expect(page.locator("#compose-status")).to_contain_text("1 pictures")
    finally:
        page.screenshot(path=artifacts / "browser-test_train.png", full_page=True)
        context.close()
