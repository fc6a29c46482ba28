"""The web app in headless Chromium (Debian's /usr/bin/chromium) driven by Playwright: both tabs, the zip, an error;
and the video tab on the tiny Wan pipeline: a player per clip.

Screenshots of every page state go to $STYLEALIGNED_SCREENSHOTS (docs/ for the README's), else a temporary folder.
Under CI (CI set) a missing browser or Playwright fails the test; elsewhere it skips with the reason.
"""

import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.test_ui import free_port, serve_app
from tests.wan_pipelines import WAN_HEIGHT, WAN_WIDTH, load_wan

CHROMIUM = "/usr/bin/chromium"
TIMEOUT = 60_000  # ms, for any one element


def need(condition: bool, reason: str) -> None:
    if not condition:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    need(sync_playwright is not None, "playwright is not installed (pip install playwright)")
    need(Path(CHROMIUM).exists() and shutil.which(CHROMIUM), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def test_both_tabs_in_a_browser(browser, tmp_path):
    shots = Path(os.environ.get("STYLEALIGNED_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    app = serve_app(tmp_path / "out", max_prompts=4, max_steps=20)
    page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT)
    try:
        page.goto(app.local_url)
        page.locator("#set-go").wait_for()
        page.screenshot(path=shots / "ui-start.png", full_page=True, animations="disabled")

        # text to set: three prompts, a few steps, the gallery, the zip
        page.locator("#set-prompts textarea").fill("a star in neon style\na circle\na heart")
        page.locator("#set-steps input[type=number]").fill("20")
        page.locator("#set-go").click()
        page.get_by_role("button", name="Thumbnail 3 of 3").wait_for()
        page.get_by_text("Done: 3 images").wait_for()
        assert [page.locator("#set-gallery img").nth(i).get_attribute("alt") for i in range(3)] == [
            "0: a star in neon style", "1: a circle", "2: a heart"]
        page.screenshot(path=shots / "ui-text-to-set.png", full_page=True, animations="disabled")
        with page.expect_download() as download:
            page.locator("#set-zip a[download]").click()
        download.value.save_as(tmp_path / "set.zip")
        archive = zipfile.ZipFile(tmp_path / "set.zip")
        names = sorted(name.split("/", 1)[1] for name in archive.namelist())
        assert names == ["00-a-star-in-neon-style.png", "01-a-circle.png", "02-a-heart.png", "grid.png", "run.json"]

        # an invalid value: a message on the page, and the server still answers
        page.locator("#set-prompts textarea").fill("\n".join(["a circle"] * 5))
        page.locator("#set-go").click()
        page.get_by_text("5 prompts, over this server's limit of 4").first.wait_for()
        page.screenshot(path=shots / "ui-error.png", animations="disabled")
        page.locator(".toast-close").first.click()
        page.get_by_text("5 prompts, over this server's limit of 4").first.wait_for(state="hidden")

        # from a reference image (the set's own reference, from the zip): upload, invert, a set in its style
        reference = tmp_path / "reference.png"
        first = next(name for name in archive.namelist() if name.endswith("/00-a-star-in-neon-style.png"))
        reference.write_bytes(archive.read(first))
        page.get_by_role("tab", name="From a reference image").click()
        page.locator("#transfer-reference input[type=file]").set_input_files(reference)
        page.locator("#transfer-reference-prompt textarea").fill("a star in neon style")
        page.locator("#transfer-prompts textarea").fill("a circle\na heart")
        page.locator("#transfer-steps input[type=number]").fill("20")
        page.locator("#transfer-go").click()
        page.get_by_role("button", name="Thumbnail 4 of 4").wait_for()
        assert [page.locator("#transfer-gallery img").nth(i).get_attribute("alt") for i in range(4)] == [
            "reference (input)", "0: a star in neon style", "1: a circle", "2: a heart"]
        page.get_by_text("Done: 3 images").last.wait_for()
        page.screenshot(path=shots / "ui-from-a-reference.png", full_page=True, animations="disabled")
    finally:
        page.close()
        app.close()


def test_the_video_tab_shows_a_player_per_clip(browser, tiny_wan_paths, tmp_path):
    from stylealigned.ui import Limits, launch

    app = launch(load_wan(tiny_wan_paths[1]), "tiny-wan", tmp_path / "out", Limits(max_side=256), port=free_port(),
                 block=False)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(TIMEOUT)
    try:
        page.goto(app.local_url)
        page.get_by_role("tab", name="Text to video set").wait_for()
        page.locator("#set-prompts textarea").fill("a cat in watercolor style\na dog\na house")
        for name, value in (("steps", 2), ("width", WAN_WIDTH), ("height", WAN_HEIGHT), ("frames", 5)):
            field = page.locator(f"#set-{name} input[type=number]")
            field.fill(str(value))
            field.press("Enter")
        page.locator("#set-go").click()
        page.get_by_text("Done: 3 clips").wait_for()
        players = page.locator("#set-gallery video")
        players.nth(2).wait_for()
        assert players.count() == 3
        assert all(players.nth(i).get_attribute("src") for i in range(3))
        record = json.loads(next((tmp_path / "out").rglob("run.json")).read_text())
        assert (record["parameters"]["num_frames"], record["parameters"]["width"]) == (5, WAN_WIDTH)
    finally:
        page.close()
        app.close()
