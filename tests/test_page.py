"""The live page (``GET /``) of ``opad serve``: over plain HTTP (served without the key, the API still
needs it, a strict Content-Security-Policy, nothing from another origin), and in a real browser:
headless Chromium (the system's, Debian's ``chromium``) driven by Playwright, against the server on
loopback with the mini world's student and two concepts of it.

The browser test skips, saying how to install them, where Playwright or Chromium is missing
(``apt-get install chromium``; ``pip install playwright``, in the test extra; never
``playwright install``: the system browser is used). ``OPAD_CHROMIUM`` names another Chromium.
Its screenshot is written to the test's temporary folder; with ``OPAD_UPDATE_SCREENSHOT=1`` also to
docs/images/live-page.png, the one the docs show.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from exportutil import KEY, LiveServer, make_concept
from PIL import Image

from opad.export.runtime import Runner
from opad.export.server.app import Settings
from opad.export.server.site import ASSETS, PAGE_DIR

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "live-page.png"
INSTALL = ("install it with `apt-get install chromium` (Debian/Ubuntu; the package is chromium-browser "
           "elsewhere) and `pip install playwright` (no `playwright install`: the system browser is used), "
           "or set OPAD_CHROMIUM to a Chromium binary")
CONCEPTS = ("mug-a", "mug-b")
PROMPT = "a photo of a <new1> mug"
MORE = " on the beach"
GENERATE = "/v1/images/generations"


def find_chromium() -> str | None:
    """OPAD_CHROMIUM, else chromium or chromium-browser on PATH."""
    given = os.environ.get("OPAD_CHROMIUM")
    if given:
        return shutil.which(given)
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The mini world's student and two concepts of it, behind a key, on loopback."""
    from opad.world.preset import world_preset_dir

    world = world_preset_dir()
    concepts = tmp_path_factory.mktemp("page") / "concepts"
    for seed, name in enumerate(CONCEPTS, 3):
        make_concept(world, concepts / name, seed=seed, word="mug")
    server = LiveServer(lambda: Runner("eager", student=str(world / "student"), torch_conditioning=True),
                        concepts, Settings(api_key=KEY))
    server.resolution = server.images("base", seed=0)[0].shape[0]  # the model's native size, from the API
    yield server
    server.stop()


def test_page_is_served_without_the_key_and_the_api_still_needs_it(server):
    status, head, html = server.request("GET", "/", key=None)
    assert status == 200 and head["content-type"] == "text/html; charset=utf-8"
    csp = head["content-security-policy"]
    assert "default-src 'self'" in csp and "img-src 'self' data: blob:" in csp and "'unsafe-inline'" not in csp
    assert head["x-content-type-options"] == "nosniff"
    assert '<script src="page/page.js" defer></script>' in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script (the CSP would block it)"
    assert not re.search(r"\sstyle=|<style", html), "an inline style (the CSP would block it)"
    for name, media in zip(ASSETS, ("text/css", "text/javascript")):
        status, head, _ = server.request("GET", f"/page/{name}", key=None)
        assert status == 200 and head["content-type"].startswith(media) and "content-security-policy" in head
    for name in ("index.html", *ASSETS):  # offline by construction: no other origin named anywhere
        text = (PAGE_DIR / name).read_text()
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|@import|fonts\.", text, re.IGNORECASE), name
    script = (PAGE_DIR / "page.js").read_text()
    for storage in ("localStorage", "sessionStorage", "document.cookie", "indexedDB", "location.search"):
        assert storage not in script  # the key lives in the script's memory only

    assert server.request("GET", "/page/nope.js", key=None)[0] == 401  # only the page's own files are open
    assert server.request("GET", "/page/nope.js")[0] == 404
    assert server.request("GET", "/page/..%2Fapp.py")[0] == 404
    for method, path in (("GET", "/v1/models"), ("POST", GENERATE), ("GET", "/metrics"), ("GET", "/ready")):
        assert server.request(method, path, {"prompt": "a mug"}, key=None)[0] == 401, path
    assert server.request("GET", "/v1/models")[0] == 200
    metrics = server.request("GET", "/metrics")[2]
    assert 'route="/"' in metrics and 'route="/page/{name}"' in metrics


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser's path, before any server is built; a skip that says how to install what is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip(f"Playwright is not installed: {INSTALL}")
    found = find_chromium()
    if found is None:
        pytest.skip(f"no Chromium found (OPAD_CHROMIUM, chromium or chromium-browser on PATH): {INSTALL}")
    return found


def test_live_page_in_headless_chromium(chromium, server, tmp_path):
    from playwright.sync_api import Error, expect, sync_playwright

    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        except Error as e:
            pytest.fail(f"{chromium} did not start under Playwright: {str(e).splitlines()[0]}")
        try:
            _drive(browser, server, tmp_path, expect)
        finally:
            browser.close()


def _drive(browser, server, tmp_path, expect) -> None:
    page = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True).new_page()
    page.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)  # generous: another job may share this machine's cores
    requests, problems, flight = [], [], {"now": 0, "most": 0}

    def sent(request):
        requests.append(request)
        if request.url.endswith(GENERATE):
            flight["now"] += 1
            flight["most"] = max(flight["most"], flight["now"])

    def done(request):
        if request.url.endswith(GENERATE):
            flight["now"] -= 1

    page.on("request", sent)
    page.on("requestfinished", done)
    page.on("requestfailed", done)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)

    # the server has a key: the page asks for it, says when it is refused, and loads the concepts with it
    page.goto(server.url + "/")
    message = page.locator("#message")
    expect(message).to_contain_text("The server needs an API key: enter it above")
    expect(page.locator("#key")).to_be_visible()
    page.fill("#key", "sk-wrong")
    page.press("#key", "Enter")
    expect(message).to_contain_text("The API key was refused")
    page.fill("#key", KEY)
    page.press("#key", "Enter")
    expect(message).to_contain_text("2 concepts served")
    expect(page.locator("#model option")).to_have_text(["no concept (base)", *CONCEPTS])

    # live: pick a concept, type, and the image follows (debounced, one request at a time, latest wins)
    page.select_option("#model", CONCEPTS[0])
    image = page.locator("#result img")
    gallery = page.locator("#gallery li")
    page.locator("#prompt").press_sequentially(PROMPT, delay=20)
    expect(image).to_have_attribute("alt", re.compile(re.escape(f"“{PROMPT}”")))
    first, shown = image.get_attribute("src"), gallery.count()
    page.locator("#prompt").press_sequentially(MORE, delay=20)
    expect(image).to_have_attribute("alt", re.compile(re.escape(f"“{PROMPT + MORE}”")))
    src = image.get_attribute("src")
    assert src != first and src.startswith("data:image/png;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert picture.format == "PNG" and picture.size == (server.resolution, server.resolution)
    # the request the page sent is the one it shows: concept, prompt, seed 0, 1 step
    want = server.images(CONCEPTS[0], seed=0, prompt=PROMPT + MORE, steps=1)[0]
    assert np.array_equal(np.asarray(picture.convert("RGB")), want)
    expect(page.locator("#timing")).to_have_text(
        re.compile(r"^Server [\d.]+ ms \(queue [\d.]+ · conditioning [\d.]+ · denoise [\d.]+ · decode [\d.]+ · "
                   r"encode [\d.]+\) · round trip [\d.]+ ms · seed 0$"))
    assert gallery.count() > shown
    generations = [r for r in requests if r.url.endswith(GENERATE)]
    assert flight["most"] == 1, "more than one generation request in flight"
    assert len(generations) < len(PROMPT + MORE) / 3, "typing was not debounced"

    shot = tmp_path / "live-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1200
    if os.environ.get("OPAD_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

    # live off: typing asks for nothing until Generate
    page.uncheck("#live")
    page.locator("#prompt").press_sequentially(" at night", delay=10)
    page.wait_for_timeout(800)
    assert len([r for r in requests if r.url.endswith(GENERATE)]) == len(generations)
    page.click("#generate")
    expect(image).to_have_attribute("alt", re.compile("at night"))

    # each image downloads as a PNG
    with page.expect_download() as download:
        page.locator("#gallery li a[download]").first.click()
    assert download.value.suggested_filename == f"opad-{CONCEPTS[0]}-seed0.png"
    assert Image.open(download.value.path()).format == "PNG"

    # the request as code: the prompt, a placeholder for the key, never the key
    for button, placeholder in (("#copy-curl", "$OPAD_API_KEY"), ("#copy-python", 'os.environ["OPAD_API_KEY"]')):
        page.click(button)
        text = page.input_value("#snippet")
        assert PROMPT + MORE + " at night" in text and placeholder in text and KEY not in text, text
        assert f'"model":"{CONCEPTS[0]}"' in text or f'model="{CONCEPTS[0]}"' in text
    expect(message).to_contain_text("Python (openai client)")

    # security and accessibility: no other origin, the key only in the Authorization header
    own = (server.url + "/", f"blob:{server.url}/", "data:")  # data: and blob: URLs are the page's own images
    assert all(r.url.startswith(own) for r in requests), [r.url for r in requests]
    assert not [r.url for r in requests if KEY in r.url]
    assert {r.headers.get("authorization") for r in requests if r.url.endswith(GENERATE)} == {f"Bearer {KEY}"}
    assert page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    unlabelled = "[...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels.length).length"
    assert page.evaluate(unlabelled) == 0
    assert page.evaluate("[...document.images].every(i => i.alt.startsWith('Generated image of'))")
    assert not problems, problems

    page.set_viewport_size({"width": 360, "height": 780})  # phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
