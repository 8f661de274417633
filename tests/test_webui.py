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
    paths = make_home(tmp_path_factory.mktemp("webui"), tiny_model_file, "tiny")
    # no invisible watermark: the inpaint tests compare the kept pixels with the original's exactly
    paths["home"].mkdir(parents=True, exist_ok=True)
    (paths["home"] / "settings.json").write_text('{"watermark": false}')
    s = LiveServer(paths).start()
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
    # the hires fix's and the refiner's panels open (their selects list the models' titles) fit too
    page.check("#enable_hr")
    page.check("#enable_refiner")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"with the hires fix and refiner panels open, the page is {overflow}px too wide"
    page.uncheck("#enable_hr")
    page.uncheck("#enable_refiner")

    # the mask editor fits too, and a finger paints the mask (touch through Pointer Events)
    _upload(page, tmp_path, _quadrants(64))
    page.click("#inpaint-box summary")
    page.click("#outpaint-box summary")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"with the mask editor, the page is {overflow}px wider than a phone screen"
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert "image to image" in page.inner_text("#mask-status")
    page.touchscreen.tap(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_function("document.querySelector('#mask-status').textContent.includes('Mask painted')")
    _shot(page, tmp_path, "webui-phone-mask.png")


# ---- inpaint, outpaint, hires fix, emphasis --------------------------------------------------------------------


def _page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#sampler option", state="attached")
    return page, errors


def _set_range(page, selector: str, value) -> None:
    page.locator(selector).evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input', "
                                    "{bubbles: true})); }", str(value))


def _basics(page, model: str, prompt: str, *, side: int, seed: int, steps: int) -> None:
    """The model, prompt, a square size, seed and steps, as a user sets them."""
    page.select_option("#model", model)
    page.fill("#prompt", prompt)
    page.fill("#width", str(side))
    page.fill("#height", str(side))
    page.fill("#seed", str(seed))
    _set_range(page, "#steps", steps)


def _generate_small(page, wait_for: str = "#results img") -> None:
    """Generate at 32x32 in 3 steps and wait for ``wait_for`` to appear."""
    page.fill("#width", "32")
    page.fill("#height", "32")
    _set_range(page, "#steps", 3)
    page.click("#generate")
    page.wait_for_selector(wait_for, timeout=60_000)


def _result_details(page) -> str:
    """Open the first result's details and return its parameters text."""
    page.click("#results img")
    page.wait_for_selector("#details[open]")
    return page.inner_text("#details-text")


def _quadrants(size: int = 64):
    """A picture with four flat colours and a gradient, so a changed pixel shows."""
    import numpy as np
    from PIL import Image

    arr = np.zeros((size, size, 3), np.uint8)
    half = size // 2
    arr[:half, :half] = (220, 40, 40)
    arr[:half, half:] = (40, 200, 60)
    arr[half:, :half] = (40, 60, 220)
    arr[half:, half:] = (230, 220, 50)
    arr[..., 2] = np.clip(arr[..., 2].astype(int) + np.arange(size)[None, :] // 4, 0, 255)
    return Image.fromarray(arr)


def _upload(page, tmp_path: Path, image, name: str = "init.png") -> None:
    path = tmp_path / name
    image.save(path)
    page.set_input_files("#init-file", str(path))
    page.wait_for_selector("#mask-editor:not([hidden])")
    page.wait_for_function(f"document.querySelector('#mask-canvas').width === {image.width}")


def _stroke(page, points, size: int | None = None) -> None:
    """A drag with the real mouse over the mask canvas through ``points`` (in the init image's pixels), one move
    event from point to point (a fast drag), or a click where there is one point."""
    if size is not None:
        _set_range(page, "#brush_size", size)
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()  # the mouse reaches only what is on the screen
    box = canvas.bounding_box()
    natural = canvas.evaluate("c => [c.width, c.height]")

    def screen(p):
        return box["x"] + (p[0] + 0.5) * box["width"] / natural[0], box["y"] + (p[1] + 0.5) * box["height"] / natural[1]

    page.mouse.move(*screen(points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*screen(p))  # one pointermove: the stroke must be interpolated between
    page.mouse.up()


def _submit(page, button: str = "#generate") -> tuple[dict, str]:
    """Click ``button``; the JSON body the page POSTed to /api/v1/jobs, and the job id the server answered."""
    def is_job_post(r):
        return r.url.endswith("/api/v1/jobs") and r.request.method == "POST"

    with page.expect_response(is_job_post) as answer:
        page.click(button)
    response = answer.value
    assert response.status == 202, response.text()
    return response.request.post_data_json, response.json()["id"]


def _finished(server, job_id: str, timeout: float = 60) -> dict:
    import httpx

    from serverkit import wait_done

    with httpx.Client(base_url=server.url, timeout=10) as client:
        job = wait_done(client, job_id, timeout)
    assert job["status"] == "done", job.get("error")
    return job


def _result_image(server, job: dict):
    import io

    import httpx
    from PIL import Image

    image = Image.open(io.BytesIO(httpx.get(server.url + job["result"]["images"][0]["url"], timeout=10).content))
    return image.convert("RGB")


def _data_url_image(data_url: str):
    import base64
    import io

    from PIL import Image

    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    image.load()
    return image


def test_paint_a_mask_and_inpaint_only_there(browser, server, tmp_path):
    import numpy as np

    page, errors = _page(browser, server)
    page.fill("#prompt", "a flower")
    page.fill("#seed", "7")
    _set_range(page, "#steps", 4)
    original = _quadrants(64)
    _upload(page, tmp_path, original)
    assert page.locator("#mask-canvas").evaluate("c => getComputedStyle(c).touchAction") == "none"
    # the preview is shown larger than the picture: the mask is still painted at the picture's own size
    assert page.locator("#mask-canvas").bounding_box()["width"] > 128
    assert "image to image" in page.inner_text("#mask-status")

    page.click("#inpaint-box summary")
    _set_range(page, "#mask_blur", 2)
    _stroke(page, [(8, 8), (24, 24)], size=8)  # one fast diagonal drag
    assert "Mask painted" in page.inner_text("#mask-status")
    _shot(page, tmp_path, "webui-mask.png")
    body, job_id = _submit(page)

    assert body["mode"] == "inpaint" and body["mask_blur"] == 2
    assert body["init_image"].startswith("data:image/png;base64,")
    mask = np.asarray(_data_url_image(body["mask_image"]).convert("L"))
    assert mask.shape == (64, 64)  # the init image's natural size, not the screen's
    assert set(np.unique(mask)) <= set(range(256)) and mask.max() == 255
    for x in range(8, 25, 2):  # the whole diagonal is painted: no gaps between the two pointer events
        assert mask[x, x] > 200, f"gap in the stroke at {x}"
    assert mask[40:, :].max() == 0 and mask[:, 40:].max() == 0

    job = _finished(server, job_id)
    assert job["request"]["mode"] == "inpaint" and job["request"]["mask_image"] == "<image>"
    result = np.asarray(_result_image(server, job)).astype(int)
    before = np.asarray(original).astype(int)
    assert result.shape == before.shape
    # outside the painted stroke plus the blur, the picture is the original exactly; inside it was repainted
    assert (result[40:, :] == before[40:, :]).all() and (result[:, 40:] == before[:, 40:]).all()
    assert np.abs(result[12:21, 12:21] - before[12:21, 12:21]).mean() > 5
    page.wait_for_selector("#results img")
    assert not errors, errors


def test_mask_eraser_invert_clear_and_inpaint_options(browser, server, tmp_path):
    import numpy as np

    page, errors = _page(browser, server)
    page.fill("#prompt", "x")
    _set_range(page, "#steps", 2)
    _upload(page, tmp_path, _quadrants(64))
    _stroke(page, [(4, 32), (60, 32)], size=8)  # a line across
    page.focus("#mask-eraser")
    page.keyboard.press("Enter")  # the tools work from the keyboard
    assert page.get_attribute("#mask-eraser", "aria-pressed") == "true"
    assert page.get_attribute("#mask-brush", "aria-pressed") == "false"
    _stroke(page, [(32, 32)], size=16)  # erase the middle of the line
    first, first_id = _submit(page)
    mask = np.asarray(_data_url_image(first["mask_image"]).convert("L"))
    assert first["mode"] == "inpaint"
    assert mask[32, 8] == 255 and mask[32, 56] == 255  # the line's ends stay
    assert mask[32, 32] == 0 and mask[32, 28] == 0  # erased
    assert mask[8, 32] == 0 and mask[56, 8] == 0  # never painted
    assert first["inpainting_fill"] == "original" and first["inpaint_full_res"] is False
    assert first["inpainting_mask_invert"] is False

    # invert the painted mask, and A1111's inpaint options
    page.click("#mask-invert")
    page.click("#inpaint-box summary")
    from brushwork.request import INPAINTING_FILLS

    fills = page.eval_on_selector_all("#inpainting_fill option", "els => els.map(e => e.value)")
    assert sorted(fills) == sorted(INPAINTING_FILLS)  # A1111's "Masked content" choices, as the server names them
    page.select_option("#inpainting_fill", "fill")
    assert page.locator("#padding-field").is_hidden()
    page.check("#inpaint_full_res")  # "Only masked"
    assert page.locator("#padding-field").is_visible()
    _set_range(page, "#inpaint_full_res_padding", 16)
    page.check("#inpainting_mask_invert")  # "Inpaint not masked"
    second, second_id = _submit(page)
    mask = np.asarray(_data_url_image(second["mask_image"]).convert("L"))
    assert mask[32, 8] == 0 and mask[32, 56] == 0
    assert mask[32, 32] == 255 and mask[8, 32] == 255 and mask[56, 8] == 255
    assert second["inpainting_fill"] == "fill" and second["inpaint_full_res"] is True
    assert second["inpaint_full_res_padding"] == 16 and second["inpainting_mask_invert"] is True

    # cleared: no mask, so image to image
    page.click("#mask-clear")
    third, third_id = _submit(page)
    assert third["mode"] == "img2img" and "mask_image" not in third

    jobs = [_finished(server, i) for i in (first_id, second_id, third_id)]
    assert [j["request"]["mode"] for j in jobs] == ["inpaint", "inpaint", "img2img"]
    assert jobs[1]["request"]["inpaint_full_res"] is True and jobs[1]["request"]["inpainting_fill"] == "fill"
    assert not errors, errors


def test_outpaint_grows_the_canvas_and_keeps_the_middle(browser, server, tmp_path):
    import numpy as np

    page, errors = _page(browser, server)
    page.fill("#prompt", "a wide landscape")
    page.fill("#seed", "3")
    _set_range(page, "#steps", 3)
    original = _quadrants(64)
    _upload(page, tmp_path, original)
    page.click("#outpaint-box summary")
    page.click("#outpaint-box [data-side='left']")  # quick button: 64 more on the left
    assert page.input_value("#outpaint_left") == "64"
    page.click("#outpaint-reset")
    page.fill("#outpaint_left", "8")
    page.fill("#outpaint_right", "5")  # 64 + 8 + 5 = 77: rounded up to 80, as `brushwork outpaint`
    assert "64x64 → 80x64" in page.inner_text("#outpaint-size")
    body, job_id = _submit(page, "#outpaint-run")

    assert body["mode"] == "inpaint" and body["width"] is None and body["inpainting_fill"] == "fill"
    canvas = np.asarray(_data_url_image(body["init_image"]).convert("RGB")).astype(int)
    mask = np.asarray(_data_url_image(body["mask_image"]).convert("L"))
    before = np.asarray(original).astype(int)
    assert canvas.shape == (64, 80, 3) and mask.shape == (64, 80)
    assert (canvas[:, 8:72] == before).all()
    assert (canvas[:, :8] == before[:, :1]).all() and (canvas[:, 72:] == before[:, -1:]).all()  # edges stretched
    assert (mask[:, :8] == 255).all() and (mask[:, 72:] == 255).all() and (mask[:, 8:72] == 0).all()

    job = _finished(server, job_id)
    result = np.asarray(_result_image(server, job)).astype(int)
    assert result.shape == (64, 80, 3)
    assert (result[:, 30:50] == before[:, 22:42]).all()  # beyond the mask blur (8) the original is kept
    assert np.abs(result[:, :4] - canvas[:, :4]).mean() > 3  # the new border was painted

    # the result becomes the init image, to outpaint it further
    page.click("#results img")
    page.wait_for_selector("#details[open]")
    page.click("#details-to-init")
    page.wait_for_function("document.querySelector('#mask-canvas').width === 80")
    assert "80x64" in page.inner_text("#outpaint-size")
    assert not errors, errors


def test_hires_fix_and_emphasis(browser, server):
    import httpx

    page, errors = _page(browser, server)
    page.fill("#prompt", "a (castle:1.3)")
    page.fill("#width", "32")
    page.fill("#height", "32")
    _set_range(page, "#steps", 2)
    upscalers = page.eval_on_selector_all("#hires_upscaler option", "els => els.map(e => e.value)")
    assert {"Latent", "Latent (bicubic)", "Lanczos", "Nearest"} <= set(upscalers) and "None" not in upscalers
    assert page.locator("#hires-panel").is_hidden()
    page.focus("#enable_hr")
    page.keyboard.press("Space")  # keyboard usable
    assert page.is_checked("#enable_hr") and page.locator("#hires-panel").is_visible()
    assert page.get_attribute("#enable_hr", "aria-expanded") == "true"
    assert "32x32 → 64x64" in page.inner_text("#hires-size")
    page.select_option("#hires_upscaler", "Lanczos")
    _set_range(page, "#hires_steps", 1)
    _set_range(page, "#hires_strength", 0.5)
    page.click("#advanced-box summary")
    assert page.eval_on_selector_all("#emphasis option", "els => els.map(e => e.value)") == [
        "Original", "No norm", "Ignore", "None"]
    page.select_option("#emphasis", "No norm")
    body, job_id = _submit(page)
    assert body["hires_scale"] == 2 and body["hires_upscaler"] == "Lanczos" and body["hires_steps"] == 1
    assert body["hires_strength"] == 0.5 and body["emphasis"] == "No norm" and body["mode"] == "txt2img"

    job = _finished(server, job_id)
    image = job["result"]["images"][0]
    assert (image["width"], image["height"]) == (64, 64)
    assert _result_image(server, job).size == (64, 64)
    meta = httpx.get(f"{server.url}/api/v1/images/{image['id']}/meta", timeout=10).json()
    assert "Hires upscale: 2" in meta["infotext"] and "Emphasis: No norm" in meta["infotext"]

    # "reuse these settings" brings the first pass's size and the hires fix back
    page.fill("#width", "")
    page.uncheck("#enable_hr")
    page.select_option("#emphasis", "Original")
    page.click("#results img")
    page.wait_for_selector("#details[open]")
    page.click("#details-reuse")
    assert page.is_checked("#enable_hr") and page.input_value("#width") == "32"
    assert page.input_value("#hires_upscaler") == "Lanczos" and page.input_value("#emphasis") == "No norm"

    # off again: the panel hides and a plain job is sent
    page.uncheck("#enable_hr")
    assert page.locator("#hires-panel").is_hidden()
    body, job_id = _submit(page)
    assert "hires_scale" not in body
    job = _finished(server, job_id)
    assert (job["result"]["images"][0]["width"], job["result"]["images"][0]["height"]) == (32, 32)
    assert not errors, errors


def test_upscale_a_picture_with_a_library_upscaler(browser, server):
    import torch

    from test_upscalers import tiny_esrgan

    folder = server.paths["models"] / "upscalers"
    folder.mkdir(exist_ok=True)
    model = folder / "tiny-4x.pth"
    torch.save(tiny_esrgan(4), model)
    try:
        page, errors = _page(browser, server)
        choices = page.eval_on_selector_all("#upscale-upscaler option", "els => els.map(e => e.value)")
        assert choices == ["Lanczos", "Nearest", "tiny-4x"] and page.input_value("#upscale-upscaler") == "tiny-4x"
        assert "tiny-4x" in page.eval_on_selector_all("#hires_upscaler option", "els => els.map(e => e.value)")
        page.fill("#prompt", "a green square")
        page.fill("#width", "32")
        page.fill("#height", "32")
        _set_range(page, "#steps", 1)
        page.uncheck("#enable_hr")
        _, job_id = _submit(page)
        _finished(server, job_id)
        page.click("#results img")
        page.wait_for_selector("#details[open]")
        page.fill("#upscale-scale", "2")
        with page.expect_response(lambda r: r.url.endswith("/sdapi/v1/extra-single-image")) as answer:
            page.click("#details-upscale")
        assert answer.value.status == 200, answer.value.text()
        sent = answer.value.request.post_data_json
        assert sent["upscaler_1"] == "tiny-4x" and sent["upscaling_resize"] == 2
        assert sent["image"].startswith("data:image/png;base64,")
        page.wait_for_function("document.querySelector('#details-img').naturalWidth === 64")
        assert page.inner_text("#upscale-status") == "64x64, tiny-4x 2x"
        assert _data_url_image(page.get_attribute("#details-download", "href")).size == (64, 64)
        # a factor the server refuses: its message, in the dialog
        page.fill("#upscale-scale", "100")
        page.click("#details-upscale")
        page.wait_for_function("document.querySelector('#upscale-status').textContent.startsWith('Cannot')")
        assert "upscaling_resize must be above 0 and at most 16" in page.inner_text("#upscale-status")
        assert not errors, errors
    finally:
        model.unlink()


def test_depth_to_image_with_an_uploaded_16_bit_depth_map(browser, server, tmp_path):
    """A depth model chosen: the panel turns to depth to image; an init image and a 16-bit depth map go to the
    server as they were, the picture comes back with the depth map it used; without a map the model's estimate."""
    import numpy as np
    from PIL import Image

    from tinymodels import save_depth_single

    model = save_depth_single(server.paths["models"] / "tiny-depth.safetensors")
    try:
        page, errors = _page(browser, server)
        page.select_option("#model", "tiny")
        assert page.locator("#depth-box").is_hidden()
        page.select_option("#model", "tiny-depth")  # the models list says its family: sd2-depth
        page.wait_for_selector("#depth-box:not([hidden])")
        assert "Depth to image" in page.inner_text("#img2img-legend")
        page.fill("#prompt", "a stone statue")
        page.fill("#seed", "7")
        _set_range(page, "#steps", 3)
        page.click("#generate")  # no init image yet: said at once, nothing queued
        page.wait_for_selector("#error:not([hidden])")
        assert "needs an init image" in page.inner_text("#error")

        _upload(page, tmp_path, _quadrants(64))
        assert page.locator("#mask-editor .mask-tools").is_hidden()  # no inpainting on a depth model
        assert page.locator("#inpaint-box").is_hidden() and page.locator("#outpaint-box").is_hidden()
        _set_range(page, "#strength", 0.6)
        ramp = np.repeat(np.linspace(65535, 0, 64)[:, None], 64, axis=1).astype(np.uint16)  # near (white) at the top
        Image.fromarray(ramp).save(tmp_path / "depth16.png")
        page.set_input_files("#depth-file", str(tmp_path / "depth16.png"))
        page.wait_for_function("document.querySelector('#depth-status').textContent.includes('64x64')")
        assert page.locator("#depth-preview").is_visible()
        body, job_id = _submit(page)

        assert body["mode"] == "depth2img" and body["model"] == "tiny-depth" and body["strength"] == 0.6
        assert "mask_image" not in body
        sent = _data_url_image(body["depth_map"])
        assert np.array_equal(np.asarray(sent).astype(int), ramp.astype(int))  # all 16 bits, not re-encoded
        job = _finished(server, job_id)
        assert job["request"]["mode"] == "depth2img" and job["request"]["depth_map"] == "<image>"
        assert _result_image(server, job).size == (64, 64)
        page.wait_for_selector("#depth-used:not([hidden])")
        page.wait_for_function("document.querySelector('#depth-used-img').naturalWidth > 0")
        src = page.get_attribute("#depth-used-img", "src")
        assert src == job["result"]["extras"]["depth_map"]
        used = np.asarray(_data_url_image(src).convert("L")).astype(int)
        assert used.shape == (32, 32)  # the latent size: what the UNet saw
        assert used[0].min() > 240 and used[-1].max() < 15 and (np.diff(used.mean(axis=1)) < 0).all()  # the ramp
        _shot(page, tmp_path, "webui-depth.png")

        # no depth map: the model's own estimate of the init image
        page.click("#depth-clear")
        assert page.locator("#depth-preview").is_hidden()
        body, job_id = _submit(page)
        assert body["mode"] == "depth2img" and "depth_map" not in body
        estimated = _finished(server, job_id)["result"]["extras"]["depth_map"]
        page.wait_for_function("src => document.querySelector('#depth-used-img').src === src", arg=estimated)
        assert estimated != src

        # another model: the panel is image to image and inpaint again
        page.select_option("#model", "tiny")
        assert page.locator("#depth-box").is_hidden() and page.locator("#mask-editor .mask-tools").is_visible()
        assert page.locator("#inpaint-box").is_visible()
        assert not errors, errors
    finally:
        import httpx

        model.unlink()
        # the default model of later tests: the library's first again, not the depth model the engine holds
        httpx.post(server.url + "/sdapi/v1/unload-checkpoint", timeout=30).raise_for_status()


# ---- LoRAs, embeddings and ControlNet (issue 15) ------------------------------------------------------------------


def test_the_size_follows_the_model_until_the_user_chooses_one(browser, server, tmp_path):
    """SDXL draws at 1024x1024, SD 1.x at 512x512 (GET /api/v1/models native_size): the size fields follow the model
    chosen, as Forge's do, until the user types a size; image to image keeps the init image's size meanwhile."""
    from tinymodels import save_xl_single

    model = save_xl_single(server.paths["models"] / "tiny-xl.safetensors")
    try:
        page, errors = _page(browser, server)

        def size():
            return page.input_value("#width"), page.input_value("#height")

        page.select_option("#model", "tiny")
        assert size() == ("512", "512")
        page.select_option("#model", "tiny-xl")  # the models list says its family: sdxl
        assert size() == ("1024", "1024")
        page.select_option("#model", "tiny")
        assert size() == ("512", "512")

        # image to image with a size the user did not choose: the init image's size, as before (not 512x512)
        _upload(page, tmp_path, _quadrants(64))
        _set_range(page, "#steps", 2)
        body, job_id = _submit(page)
        assert body["mode"] == "img2img" and body["width"] is None and body["height"] is None
        assert _result_image(server, _finished(server, job_id)).size == (64, 64)
        page.click("#init-clear")

        page.fill("#width", "640")  # the user's own size stays, over model changes and a reload
        page.select_option("#model", "tiny-xl")
        assert size() == ("640", "512")
        page.reload()
        page.wait_for_selector("#sampler option", state="attached")
        assert page.input_value("#model") == "tiny-xl" and size() == ("640", "512")
        page.select_option("#model", "tiny")
        assert size() == ("640", "512")

        # both fields emptied: the size follows the model again
        page.fill("#width", "")
        page.fill("#height", "")
        page.select_option("#model", "tiny-xl")
        assert size() == ("1024", "1024")
        assert not errors, errors
    finally:
        model.unlink()


def test_lora_panel_toggles_the_tag_and_a_generation_with_it_has_lora_hashes(browser, server, tiny_model_file):  # noqa: F811
    import torch
    from safetensors.torch import save_file

    from brushwork.models.load import load_single_file
    from test_lora import kohya_lora

    folder = server.paths["models"] / "lora"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "webstyle.safetensors"
    (server.paths["models"] / "embeddings").mkdir(parents=True, exist_ok=True)
    embedding = server.paths["models"] / "embeddings" / "webtoken.safetensors"
    save_file({"emb_params": torch.randn((1, 32), generator=torch.Generator().manual_seed(3))}, embedding)
    page, errors = _page(browser, server)
    try:
        page.click("#lora-box summary")
        page.wait_for_selector("#lora-list .hint")  # none yet
        # a LoRA written now shows after Refresh (POST /sdapi/v1/refresh-loras, then the list again)
        save_file(kohya_lora(load_single_file(tiny_model_file)), path)
        page.click("#lora-refresh")
        chip = page.locator("#lora-list .lora-chip[data-name='webstyle']")
        chip.wait_for()

        page.fill("#prompt", "a red circle, blue sky")
        page.locator("#prompt").evaluate("el => el.setSelectionRange(12, 12)")  # after "a red circle"
        page.fill("#lora-strength", "0.8")
        chip.click()
        assert page.input_value("#prompt") == "a red circle <lora:webstyle:0.8>, blue sky"
        assert "on" in chip.get_attribute("class")
        chip.click()  # a second click takes the tag out again, as A1111's cards do
        assert page.input_value("#prompt") == "a red circle, blue sky"
        assert "on" not in chip.get_attribute("class")
        page.fill("#lora-strength", "1")
        page.locator("#prompt").evaluate("el => el.setSelectionRange(el.value.length, el.value.length)")
        chip.click()
        assert page.input_value("#prompt") == "a red circle, blue sky <lora:webstyle:1>"

        page.fill("#seed", "7")
        _generate_small(page)
        text = _result_details(page)
        assert "<lora:webstyle:1>" in text and 'Lora hashes: "webstyle: ' in text, text
        page.click("#details button[value=close]")

        # an embedding "loaded" for the model now loaded (the tiny text encoder's width) inserts its name at the
        # cursor (Refresh reads the embeddings again too)
        page.click("#lora-refresh")
        page.fill("#prompt", "a cat")
        page.locator("#prompt").evaluate("el => el.setSelectionRange(5, 5)")
        page.click("#embedding-list .embedding-chip[data-name='webtoken']")
        assert page.input_value("#prompt") == "a cat webtoken"
        assert not errors, errors
    finally:
        path.unlink(missing_ok=True)
        embedding.unlink(missing_ok=True)


def test_controlnet_panel_previews_canny_and_generates_with_two_units(browser, server, tmp_path):
    """Unit 0 follows a canny map (previewed first), unit 1 the inverted picture of its own: both go in the job's
    controlnet list, and the picture comes back with both maps and both units in its parameters."""
    from test_controlnet import build_controlnet, control_picture, save_original

    folder = server.paths["models"] / "controlnet"
    folder.mkdir(parents=True, exist_ok=True)
    path = save_original(build_controlnet(0), folder / "tiny_canny.safetensors")
    pictures = [tmp_path / "control0.png", tmp_path / "control1.png"]
    for seed, picture in enumerate(pictures):
        control_picture(seed, 64).save(picture)
    page, errors = _page(browser, server)
    try:
        page.click("#controlnet-box summary")
        assert page.locator("#cn-tabs [role=tab]").count() == 3  # A1111's three units
        page.wait_for_selector("#cn-module-0 option[value='canny']", state="attached")
        page.wait_for_function("[...document.querySelectorAll('#cn-model-1 option')].some(o => "
                               "o.value.startsWith('tiny_canny'))")
        page.set_input_files("#cn-file-0", str(pictures[0]))
        page.wait_for_selector("#cn-image-preview-0:not([hidden])")
        assert page.is_checked("#cn-enabled-0")  # an image turns the unit on
        assert "on" in page.get_attribute("#cn-tab-0", "class") and page.locator("#cn-unit-1").is_hidden()
        page.select_option("#cn-module-0", "canny")
        page.click("#cn-preview-0")
        page.wait_for_selector("#cn-map-0:not([hidden])")
        page.wait_for_function("document.querySelector('#cn-map-0').naturalWidth > 0")
        assert page.get_attribute("#cn-map-0", "src").startswith("data:image/png;base64,")

        page.click("#cn-tab-1")
        assert page.locator("#cn-unit-1").is_visible() and page.locator("#cn-unit-0").is_hidden()
        page.set_input_files("#cn-file-1", str(pictures[1]))
        page.wait_for_selector("#cn-image-preview-1:not([hidden])")
        page.select_option("#cn-module-1", "invert")
        _set_range(page, "#cn-weight-1", 0.5)
        assert page.inner_text("#cn-weight-out-1") == "0.5" and page.inner_text("#cn-weight-out-0") == "1"
        assert not page.is_checked("#cn-enabled-2")

        page.fill("#prompt", "a red circle")
        page.fill("#width", "32")
        page.fill("#height", "32")
        _set_range(page, "#steps", 3)
        body, job_id = _submit(page)
        units = body["controlnet"]
        assert [u["module"] for u in units] == ["canny", "invert"] and [u["weight"] for u in units] == [1, 0.5]
        assert units[0]["image"] != units[1]["image"] and all(u["image"].startswith("data:image/png") for u in units)
        page.wait_for_function("document.querySelectorAll('#cn-used img').length === 2", timeout=60_000)
        page.wait_for_function("[...document.querySelectorAll('#cn-used img')].every(i => i.naturalWidth > 0)")
        details = _result_details(page)
        assert "ControlNet 0: " in details and "ControlNet 1: " in details
        assert "Module: canny" in details and "Module: invert" in details
        assert not errors, errors
    finally:
        path.unlink(missing_ok=True)


# ---- hires checkpoint / sampler / prompt, and the refiner (A1111's txt2img controls) -----------------------------


def test_hires_checkpoint_sampler_and_prompt(browser, server):
    """The hires fix's second pass on another model of the library, with its own sampler and prompt: the picture's
    parameters name them as A1111 writes them; "Use same ..." and empty prompts are not sent at all."""
    import re

    import httpx

    from tinymodels import save_single

    model = save_single(server.paths["models"] / "tiny-hires.safetensors", "sd1", seed=1)
    try:
        page, errors = _page(browser, server)
        _basics(page, "tiny", "a castle", side=32, seed=5, steps=2)
        assert page.locator("#hires_checkpoint").is_hidden()  # inside the closed hires panel
        page.check("#enable_hr")
        checkpoints = page.eval_on_selector_all("#hires_checkpoint option", "els => els.map(e => [e.value, e.text])")
        assert checkpoints[0] == ["", "Use same checkpoint"] and "tiny-hires" in [v for v, _ in checkpoints]
        samplers = page.eval_on_selector_all("#hires_sampler option", "els => els.map(e => [e.value, e.text])")
        assert samplers[0] == ["", "Use same sampler"] and ["Euler", "Euler"] in samplers
        assert page.input_value("#hires_checkpoint") == "" and page.input_value("#hires_sampler") == ""
        page.select_option("#hires_checkpoint", "tiny-hires")
        page.select_option("#hires_sampler", "Euler")
        page.fill("#hires_prompt", "a tower at night")
        page.fill("#hires_negative_prompt", "fog")
        _set_range(page, "#hires_steps", 1)
        body, job_id = _submit(page)
        assert body["hires_checkpoint"] == "tiny-hires" and body["hires_sampler"] == "Euler"
        assert body["hires_prompt"] == "a tower at night" and body["hires_negative_prompt"] == "fog"
        assert "hires_scheduler" not in body and "refiner" not in body

        job = _finished(server, job_id)
        page.wait_for_selector("#results img")
        text = _result_details(page)
        assert re.search(r"Hires checkpoint: tiny-hires \[[0-9a-f]+\]", text), text
        assert "Hires prompt: a tower at night" in text and "Hires negative prompt: fog" in text, text
        assert "Hires sampler: Euler" in text, text
        meta = httpx.get(f"{server.url}/api/v1/images/{job['result']['images'][0]['id']}/meta", timeout=10).json()
        assert "Hires checkpoint: tiny-hires [" in meta["infotext"]

        # "reuse these settings" brings them back
        page.click("#details button[value=close]")
        page.select_option("#hires_checkpoint", "")
        page.fill("#hires_prompt", "")
        page.uncheck("#enable_hr")
        page.click("#results img")
        page.wait_for_selector("#details[open]")
        page.click("#details-reuse")
        assert page.is_checked("#enable_hr") and page.input_value("#hires_checkpoint") == "tiny-hires"
        assert page.input_value("#hires_sampler") == "Euler" and page.input_value("#hires_prompt") == "a tower at night"

        # the same checkpoint, sampler and prompt again: none of the fields is sent
        page.select_option("#hires_checkpoint", "")
        page.select_option("#hires_sampler", "")
        page.fill("#hires_prompt", "")
        page.fill("#hires_negative_prompt", "  ")
        body, job_id = _submit(page)
        assert body["hires_scale"] == 2
        assert not {"hires_checkpoint", "hires_sampler", "hires_prompt", "hires_negative_prompt"} & set(body), body
        _finished(server, job_id)
        assert not errors, errors
    finally:
        model.unlink()
        httpx.post(server.url + "/sdapi/v1/unload-checkpoint", timeout=30).raise_for_status()


def test_refiner_panel_on_sdxl_and_the_servers_refusals(browser, server):
    """The Refiner panel: an SDXL model finished by a tiny SDXL refiner from half the steps (the picture's
    parameters say so); on an SD 1.x model, or with a hires checkpoint, the server's one-line refusal shows in the
    error box and the next generation works."""
    import httpx

    from tinymodels import save_xl_single

    models = server.paths["models"]
    base = save_xl_single(models / "tiny-xl.safetensors")
    refiner = save_xl_single(models / "tiny-xl-refiner.safetensors", seed=1, refiner=True)
    try:
        page, errors = _page(browser, server)
        assert page.locator("#refiner-panel").is_hidden() and not page.is_checked("#enable_refiner")
        page.uncheck("#enable_hr")
        _basics(page, "tiny-xl", "a red circle", side=64, seed=7, steps=4)
        page.select_option("#sampler", "Euler")
        # plain: no refiner fields at all
        body, job_id = _submit(page)
        assert "refiner" not in body and "refiner_switch_at" not in body
        _finished(server, job_id)

        page.check("#enable_refiner")
        assert page.locator("#refiner-panel").is_visible()
        assert page.get_attribute("#enable_refiner", "aria-expanded") == "true"
        names = page.eval_on_selector_all("#refiner option", "els => els.map(e => e.value)")
        assert {"tiny", "tiny-xl", "tiny-xl-refiner"} <= set(names)
        assert page.input_value("#refiner") == "tiny-xl-refiner"  # the library's SDXL refiner is offered first
        assert page.input_value("#refiner_switch_at") == "0.8" and page.inner_text("#refiner-switch-out") == "0.80"
        _set_range(page, "#refiner_switch_at", 0.5)
        assert page.inner_text("#refiner-switch-out") == "0.50"
        body, job_id = _submit(page)
        assert body["refiner"] == "tiny-xl-refiner" and body["refiner_switch_at"] == 0.5
        job = _finished(server, job_id)
        assert _result_image(server, job).size == (64, 64)
        image_id = job["result"]["images"][0]["id"]  # the refined picture shown (not the plain one before it)
        # (the whole id at the URL's end: a short one, as "1", is also in the host, port or "/api/v1/")
        page.wait_for_function("id => document.querySelector('#results img')?.src.endsWith(`/images/${id}`)",
                               arg=image_id, timeout=30_000)
        text = _result_details(page)
        assert "Refiner: tiny-xl-refiner [" in text and "Refiner switch at: 0.5" in text, text
        page.click("#details button[value=close]")

        # a refiner on an SD 1.x model: the job fails with the engine's one line, shown in the error box
        page.select_option("#model", "tiny")
        page.fill("#width", "32")
        page.fill("#height", "32")
        _set_range(page, "#steps", 2)
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        message = page.inner_text("#error")
        assert "a refiner takes over from an SDXL model" in message and "\n" not in message.strip(), message

        # a hires checkpoint with a refiner: refused at once (400), its message in the same box
        page.check("#enable_hr")
        page.select_option("#hires_checkpoint", "tiny")
        with page.expect_response(lambda r: r.url.endswith("/api/v1/jobs") and r.request.method == "POST") as answer:
            page.click("#generate")
        assert answer.value.status == 400
        page.wait_for_function("document.querySelector('#error').textContent.includes('do not go together')")
        assert page.locator("#error").is_visible()

        # the refiner off again: the UI keeps working, the error box clears
        page.select_option("#hires_checkpoint", "")
        page.uncheck("#enable_hr")
        page.uncheck("#enable_refiner")
        assert page.locator("#refiner-panel").is_hidden()
        body, job_id = _submit(page)
        assert "refiner" not in body
        assert page.locator("#error").is_hidden()
        _finished(server, job_id)
        assert not errors, errors
    finally:
        base.unlink()
        refiner.unlink()
        httpx.post(server.url + "/sdapi/v1/unload-checkpoint", timeout=30).raise_for_status()
