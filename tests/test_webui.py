"""The web UI in a real headless Chromium against a real ``brushwork serve`` and the tiny model."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from serverkit import LiveServer, make_home, tiny_model_file  # noqa: F401

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("BRUSHWORK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_model_file, tmp_path_factory):  # noqa: F811
    s = LiveServer(make_home(tmp_path_factory.mktemp("webui"), tiny_model_file, "tiny")).start()
    yield s
    s.stop()


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("BRUSHWORK_SCREENSHOTS")  # a folder to keep the screenshots in
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def test_generate_watch_progress_and_find_the_picture_in_the_gallery(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#sampler option", state="attached")
    assert page.locator("#model option").count() >= 2  # "default" and the tiny model

    page.fill("#prompt", "a red circle on a blue sky")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.fill("#seed", "1234")
    page.select_option("#token_merging_ratio", "0.5")
    page.locator("#steps").evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input', "
                                    "{bubbles: true})); }", "60")
    page.locator("#cfg_end").evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input', "
                                      "{bubbles: true})); }", "0.5")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")

    # the progress bar moves while the picture is being made
    values, seen_preview, shot = set(), False, None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        value = int(page.get_attribute("#progressbar", "aria-valuenow") or 0)
        values.add(value)
        seen_preview = seen_preview or page.locator("#live-preview").is_visible()
        if shot is None and 20 <= value <= 80 and seen_preview:
            shot = _shot(page, tmp_path, "webui-progress.png")
        if page.locator("#gallery figure img").count():
            break
        time.sleep(0.05)
    assert len({v for v in values if 0 < v < 100}) >= 2, f"the progress bar never moved: {sorted(values)}"
    assert seen_preview, "no live preview was shown"

    page.wait_for_selector("#gallery figure img")
    page.wait_for_function("document.querySelector('#gallery figure img').naturalWidth > 0")
    assert page.locator("#results img").count() == 1
    assert "done" in page.inner_text("#progress-text")
    assert page.inner_text("#gallery figcaption").startswith("a red circle")
    shot = _shot(page, tmp_path, "webui-done.png")
    assert shot.stat().st_size > 10_000

    # details, then "reuse these settings" brings the seed and prompt back
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    page.select_option("#token_merging_ratio", "0")
    page.locator("#cfg_end").evaluate("el => { el.value = '1'; }")
    page.click("#gallery figure")
    page.wait_for_selector("#details[open]")
    assert "Seed: 1234" in page.inner_text("#details-text")
    assert "Token merging ratio: 0.5" in page.inner_text("#details-text")
    assert "CFG end: 0.5" in page.inner_text("#details-text")
    assert page.get_attribute("#details-download", "href").endswith("?download=true")
    page.click("#details-reuse")
    assert page.input_value("#seed") == "1234"
    assert page.input_value("#token_merging_ratio") == "0.5"
    assert page.input_value("#cfg_end") == "0.5"
    assert page.input_value("#prompt") == "a red circle on a blue sky"

    # settings survive a reload (localStorage)
    page.reload()
    page.wait_for_selector("#sampler option", state="attached")
    assert page.input_value("#prompt") == "a red circle on a blue sky"
    assert page.input_value("#steps") == "60"
    assert not errors, errors


def test_bad_input_shows_a_clear_message(browser, server):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#sampler option", state="attached")
    page.fill("#prompt", "x")
    page.fill("#width", "36")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "multiple of 8" in page.inner_text("#error")


def test_img2img_upload_modifiers_styles_and_cancel(browser, server, tmp_path):
    from PIL import Image

    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#sampler option", state="attached")
    page.fill("#prompt", "a bird")
    page.click(".chip[data-text='watercolor']")
    assert page.input_value("#prompt") == "a bird, watercolor"

    # a saved style is applied on top of the prompt
    page.click("#styles-box summary")
    page.fill("#style-name", "moody")
    page.fill("#negative_prompt", "bright")
    page.click("#style-save")
    page.fill("#prompt", "a cat")
    page.fill("#negative_prompt", "")
    page.click("#style-apply")
    assert page.input_value("#prompt") == "a cat, a bird, watercolor"
    assert page.input_value("#negative_prompt") == "bright"

    # drag and drop a picture onto the drop zone
    page.evaluate("""async () => {
        const canvas = Object.assign(document.createElement('canvas'), {width: 32, height: 32});
        canvas.getContext('2d').fillRect(0, 0, 16, 16);
        const blob = await new Promise((ok) => canvas.toBlob(ok, 'image/png'));
        const data = new DataTransfer();
        data.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    }""")
    page.wait_for_selector("#init-preview:not([hidden])")
    assert page.get_attribute("#init-preview", "src").startswith("data:image/png;base64,")
    page.click("#init-clear")
    assert page.locator("#init-preview").is_hidden()
    # or choose a file
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (30, 200, 30)).save(init)
    page.set_input_files("#init-file", str(init))
    page.wait_for_selector("#init-preview:not([hidden])")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.locator("#steps").evaluate("(el) => { el.value = 150; el.dispatchEvent(new Event('input', "
                                    "{bubbles: true})); }")
    before = page.locator("#gallery figure").count()
    page.click("#generate")
    # it shows in the queue with a cancel button; cancelling stops it
    page.wait_for_selector("#queue li[data-job] button", timeout=60_000)
    page.click("#queue li[data-job] button")
    page.wait_for_function("document.querySelector('#progress-text').textContent.includes('cancelled')",
                           timeout=30_000)
    assert page.locator("#gallery figure").count() == before

    page.locator("#steps").evaluate("(el) => { el.value = 3; el.dispatchEvent(new Event('input', "
                                    "{bubbles: true})); }")
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length > {before}", timeout=60_000)
    assert page.locator("#results img").count() == 1

    # the gallery search finds pictures by prompt
    page.fill("#gallery-search", "zebra")
    page.wait_for_selector("#gallery .empty")
    assert "No pictures match" in page.inner_text("#gallery")
    page.fill("#gallery-search", "watercolor")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length === 1")


def test_phone_width_has_no_sideways_scrolling(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.goto(server.url + "/")
    page.wait_for_selector("#sampler option", state="attached")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    box = page.locator("#generate").bounding_box()
    assert box["width"] > 300  # the main button spans the screen
    _shot(page, tmp_path, "webui-phone.png")
