"""End-to-end test of the attention page (GET /attention) in headless Chromium.

Uses the ``live_server`` fixture from ``tests/conftest.py``: the base URL of a real uvicorn
running the real app with a tiny trained model. The page's numbers are compared with what
``POST /predict`` returns for the same file, so the test checks the whole path
upload -> service -> JSON -> rendering.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from tests.conftest import missing

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
UNUSUAL_THRESHOLD = 0.15

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def browser():
    # Skips locally, fails under CI=true: a CI that cannot run the browser is broken.
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing: install Debian's chromium to run browser tests")
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _predict(base_url: str, name: str, data: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/predict",
        params={"top_k": 3, "include_input": "true"},
        files={"file": (name, data, content_type)},
        timeout=60,
    )


def test_attention_page(browser, live_server: str, cifar_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    cat_image = cifar_dir / "test" / "cat" / "0000.jpg"
    base = live_server.rstrip("/")

    # What the API says about the same file; the page must show exactly this.
    resp = _predict(base, cat_image.name, cat_image.read_bytes(), "image/jpeg")
    assert resp.status_code == 200, resp.text
    api = resp.json()
    expected = api["predictions"][0]
    ref_resp = httpx.get(f"{base}/attention/reference", timeout=60)
    assert ref_resp.status_code == 200, ref_resp.text
    typical_rows = ref_resp.json()["by_predicted_class"][expected["label"]]
    assert len(typical_rows) == 7

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page_errors: list[str] = []
    foreign_requests: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    # The page is served with a self-only Content-Security-Policy: anything it blocks
    # (an inline script, a foreign URL, an inline style) is reported on the console.
    csp_violations: list[str] = []
    page.on(
        "console",
        lambda msg: (
            csp_violations.append(msg.text) if "Content Security Policy" in msg.text else None
        ),
    )

    def record_request(req) -> None:
        if not req.url.startswith((base, "data:", "blob:")):
            foreign_requests.append(req.url)

    page.on("request", record_request)
    try:
        response = page.goto(f"{base}/attention")
        assert response is not None and "default-src 'self'" in response.headers.get(
            "content-security-policy", ""
        )
        expect(page.locator("#model-name")).to_have_text(str(api["model"]["name"]))
        expect(page.locator("#model-version")).to_have_text(str(api["model"]["version"]))
        expect(page.locator("#error")).to_be_hidden()

        # ---- upload a real image
        page.set_input_files("#file-input", str(cat_image))
        groups = page.locator("#attention-chart [data-block]")
        rows = page.locator("#probabilities-chart [data-class]")
        expect(groups).to_have_count(len(expected["attention"]), timeout=TIMEOUT_MS)
        expect(rows).to_have_count(10)
        expect(page.locator("#app")).to_have_attribute("data-state", "ready")
        expect(page.locator("#error")).to_be_hidden()

        # Prediction
        assert page.locator("#predicted-label").text_content() == expected["label"]
        confidence = page.locator("#confidence").text_content()
        assert confidence.endswith(" %"), confidence
        assert abs(float(confidence[:-2]) - expected["confidence"] * 100) <= 0.05 + 1e-9

        # Model input: the 32x32 image from the API, shown enlarged.
        model_input = page.locator("#model-input")
        assert model_input.get_attribute("src") == expected["model_input"]
        page.wait_for_function(
            "() => { const i = document.getElementById('model-input');"
            " return i.complete && i.naturalWidth > 0; }"
        )
        natural, shown = model_input.evaluate(
            "i => [[i.naturalWidth, i.naturalHeight], [i.clientWidth, i.clientHeight]]"
        )
        assert natural == [32, 32]
        assert shown[0] >= 128 and shown[1] >= 128
        assert model_input.get_attribute("alt")

        # Probabilities: one row per class, same values as the API, sorted descending.
        shown_probs = rows.evaluate_all(
            "els => els.map(e => [e.dataset.class, Number(e.dataset.value),"
            " e.dataset.predicted === 'true'])"
        )
        api_probs = expected["probabilities"]
        assert len(shown_probs) == 10
        assert {c for c, _, _ in shown_probs} == set(api_probs)
        for cls, value, _ in shown_probs:
            assert math.isclose(value, api_probs[cls], abs_tol=1e-6), cls
        values = [v for _, v, _ in shown_probs]
        assert values == sorted(values, reverse=True)
        assert [c for c, _, highlighted in shown_probs if highlighted] == [expected["label"]]

        # Attention: 7 groups, 2 bars each, weights sum to 1 and equal the API's.
        shown_att = groups.evaluate_all(
            "els => els.map(g => ({block: Number(g.dataset.block),"
            " unusual: g.dataset.unusual === 'true', text: g.textContent,"
            " weights: [...g.querySelectorAll('[data-weight]')].map(b => Number(b.dataset.weight)),"
            " typical: [...g.querySelectorAll('[data-typical]')]"
            ".map(b => Number(b.dataset.typical))}))"
        )
        assert len(shown_att) == 7
        for got, want in zip(shown_att, expected["attention"], strict=True):
            assert got["block"] == want["block"]
            assert f"block {want['block']}" in got["text"]
            assert "branch 1" in got["text"] and "branch 2" in got["text"]
            assert len(got["weights"]) == 2
            assert math.isclose(sum(got["weights"]), 1.0, abs_tol=1e-4)
            for w_page, w_api in zip(got["weights"], want["weights"], strict=True):
                assert math.isclose(w_page, w_api, abs_tol=1e-6)

        # Comparison with the model's typical attention for the predicted class.
        expect(page.locator("#legend-typical")).to_have_text(f"typical {expected['label']}")
        for got, typ in zip(shown_att, typical_rows, strict=True):
            assert len(got["typical"]) == 2
            for t_page, t_ref in zip(got["typical"], typ, strict=True):
                assert math.isclose(t_page, t_ref, abs_tol=1e-6)
            unusual = any(
                abs(w - t) > UNUSUAL_THRESHOLD
                for w, t in zip(got["weights"], got["typical"], strict=True)
            )
            assert got["unusual"] == unusual
            assert ("Unusual" in got["text"]) == unusual
        expect(page.locator("#legend-this")).to_have_text("this image")

        # Screenshots: desktop, then a phone viewport without horizontal scrolling.
        desktop = tmp_path / "attention.png"
        page.screenshot(path=str(desktop), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        overflow = page.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"page scrolls sideways by {overflow}px on a phone"
        phone = tmp_path / "attention-phone.png"
        page.screenshot(path=str(phone), full_page=True)
        for shot in (desktop, phone):
            assert shot.exists() and shot.stat().st_size > 0, shot
        page.set_viewport_size({"width": 1280, "height": 900})

        # ---- a text file renamed .jpg: the API refuses it, the page shows its message.
        fake = tmp_path / "not-an-image.jpg"
        fake.write_bytes(b"this is plain text, not a JPEG\n" * 4)
        bad = _predict(base, fake.name, fake.read_bytes(), "image/jpeg")
        assert 400 <= bad.status_code < 500, bad.text
        message = bad.json()["error"]["message"]
        assert message

        page.set_input_files("#file-input", str(fake))
        error = page.locator("#error")
        expect(error).to_be_visible()
        expect(error).to_have_text(message)
        assert error.get_attribute("role") == "alert"
        expect(page.locator("#results")).to_be_hidden()

        assert page_errors == [], page_errors
        assert foreign_requests == [], f"the page fetched from elsewhere: {foreign_requests}"
        assert csp_violations == [], csp_violations
    finally:
        page.close()


# ------------------------------------------------------------------ explanations


def _explain(base_url: str, name: str, data: bytes, **params) -> dict:
    """What the page asks /explain for (PNG maps, strength maps per branch)."""
    r = httpx.post(
        f"{base_url}/explain",
        params={"encoding": "png", "branch_maps": "strength", **params},
        files={"file": (name, data, "image/png")},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["explanations"][0]


def _luminance(rgb: str) -> float:
    """Relative luminance (WCAG) of a computed ``rgb(r, g, b)`` colour."""
    values = [int(v) / 255 for v in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3]]
    lin = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in values]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _contrast(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


MAP_KEYS = [
    "block-1", "block-2", "block-3", "block-4", "macro-1",
    "block-5", "block-6", "block-7", "macro-2",
]  # fmt: skip


def _map_png(e: dict, key: str) -> str:
    kind, number = key.split("-")
    if kind == "macro":
        return e["macro_blocks"][int(number) - 1]["gradcam"]["png"]
    return next(b for b in e["blocks"] if b["block"] == int(number))["gradcam"]["png"]


def test_attention_page_explanations(browser, live_server: str, cifar_dir: Path, tmp_path: Path):
    """Heat maps over the upload and the model input, the block and class selectors (by
    keyboard), the branch maps beside the attention weights, light and dark mode."""
    from PIL import Image
    from playwright.sync_api import expect

    base = live_server.rstrip("/")
    # A 4:3 upload: the map must cover the whole picture (the model input is the whole
    # image stretched to 32x32), not the letterboxed square around it.
    upload = tmp_path / "cat-4x3.png"
    Image.open(cifar_dir / "test" / "cat" / "0000.jpg").convert("RGB").resize(
        (128, 96), Image.Resampling.BICUBIC
    ).save(upload)
    data = upload.read_bytes()
    expected = _explain(base, upload.name, data)
    predicted = expected["prediction"]["label"]
    classes = list(expected["prediction"]["probabilities"])
    assert expected["target"] == classes.index(predicted)

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on(
        "console",
        lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    app = page.locator("#app")
    try:
        page.goto(f"{base}/attention")
        expect(app).to_have_attribute("data-explain-state", "idle")
        page.set_input_files("#file-input", str(upload))
        expect(app).to_have_attribute("data-explain-state", "ready", timeout=TIMEOUT_MS)

        # ---- defaults: the predicted class, macro block 2 over both pictures
        select = page.locator("#explain-class")
        expect(select).to_have_value(str(expected["target"]))
        assert select.locator("option").count() == 10
        assert "(predicted)" in select.locator("option:checked").text_content()
        expect(app).to_have_attribute("data-explain-block", "macro-2")
        radios = page.locator("#explain-block-options input[name=explain-block]")
        assert radios.evaluate_all("rs => rs.map(r => r.value)") == MAP_KEYS
        for overlay in ("#overlay-original", "#overlay-input"):
            expect(page.locator(overlay)).to_be_visible()
            assert page.locator(overlay).get_attribute("src") == _map_png(expected, "macro-2")
        expect(page.locator("#explain-caption")).to_contain_text("where the evidence for")
        expect(page.locator("#explain-legend")).to_be_visible()
        # the overlay covers the 4:3 picture exactly, inside the square frame
        box = page.locator("#overlay-original").bounding_box()
        frame = page.locator("#original-frame").bounding_box()
        assert box["width"] == pytest.approx(box["height"] * 4 / 3, abs=1.5)
        assert box["width"] == pytest.approx(frame["width"] - 2, abs=1.5)  # (frame border)
        assert box["y"] > frame["y"] + 10  # letterboxed: not at the frame's top

        # ---- per-branch maps beside the attention weights, and who carries the class
        def branch_maps() -> list[dict]:
            return page.locator("#attention-chart [data-block]").evaluate_all(
                "gs => gs.map(g => ({block: Number(g.dataset.block),"
                " maps: [...g.querySelectorAll('.branch-map')].map(m =>"
                " m.querySelector('img.heat-overlay').getAttribute('src')),"
                " shares: JSON.parse(g.querySelector('.att-share').dataset.shares),"
                " text: g.querySelector('.att-share').textContent}))"
            )

        shown = branch_maps()
        assert [g["block"] for g in shown] == list(range(1, 8))
        for got, block in zip(shown, expected["blocks"], strict=True):
            assert got["maps"] == [b["strength"]["png"] for b in block["branches"]]
            assert got["shares"] == pytest.approx([b["gradcam_share"] for b in block["branches"]])
            assert got["text"].startswith(f"Carries {predicted}: branch ")

        # ---- keyboard: Tab from the class selector reaches the checked map, arrows move it
        select.focus()
        for want in ("explain-show", "explain-opacity", "explain-macro-2"):
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.id") == want
        page.keyboard.press("ArrowLeft")
        expect(app).to_have_attribute("data-explain-block", "block-7")
        assert page.locator("#overlay-input").get_attribute("src") == _map_png(expected, "block-7")
        page.keyboard.press("ArrowLeft")
        expect(app).to_have_attribute("data-explain-block", "block-6")
        assert page.locator("#overlay-input").get_attribute("src") == _map_png(expected, "block-6")
        expect(page.locator("#explain-caption")).to_contain_text("what this block responds to")

        # opacity and the on/off switch, by keyboard
        page.focus("#explain-opacity")
        page.keyboard.press("ArrowLeft")
        opacity = "getComputedStyle(document.getElementById('overlay-input')).opacity"
        page.wait_for_function(f"() => Math.abs({opacity} - 0.75) < 0.01")
        page.focus("#explain-show")
        page.keyboard.press("Space")
        page.wait_for_function(f"() => Number({opacity}) === 0")
        page.keyboard.press("Space")
        page.wait_for_function(f"() => Number({opacity}) > 0.7")

        # ---- another class, chosen with the keyboard: new maps, same block
        select.focus()
        key = "ArrowDown" if expected["target"] < 9 else "ArrowUp"
        other = expected["target"] + (1 if key == "ArrowDown" else -1)
        page.keyboard.press(key)
        expect(app).to_have_attribute("data-explain-target", str(other), timeout=TIMEOUT_MS)
        expect(app).to_have_attribute("data-explain-state", "ready")
        expect(app).to_have_attribute("data-explain-block", "block-6")
        second = _explain(base, upload.name, data, **{"class": str(other)})
        assert second["target"] == other
        src = page.locator("#overlay-input").get_attribute("src")
        assert src == _map_png(second, "block-6")
        assert any(_map_png(second, k) != _map_png(expected, k) for k in MAP_KEYS), (
            "no map changed with the class"
        )
        shown = branch_maps()
        for got, block in zip(shown, second["blocks"], strict=True):
            # where a branch is strong does not depend on the class; its share of it does
            assert got["maps"] == [b["strength"]["png"] for b in block["branches"]]
            assert got["shares"] == pytest.approx([b["gradcam_share"] for b in block["branches"]])
            assert got["text"].startswith(f"Carries {classes[other]}: ")
        expect(page.locator("#explain-caption")).to_contain_text(classes[other])

        # ---- readable in light and dark mode (WCAG AA for body and secondary text)
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            colours = page.evaluate(
                "() => { const c = s => getComputedStyle(document.querySelector(s));"
                " return {surface: c('.card').backgroundColor, text: c('#explain-heading').color,"
                " muted: c('#explain-caption').color, body: c('body').backgroundColor}; }"
            )
            dark = _luminance(colours["body"]) < 0.1
            assert dark == (scheme == "dark"), (scheme, colours)
            assert _contrast(colours["text"], colours["surface"]) >= 7, (scheme, colours)
            assert _contrast(colours["muted"], colours["surface"]) >= 4.5, (scheme, colours)
            for width, height, name in ((1280, 900, "desktop"), (390, 844, "phone")):
                page.set_viewport_size({"width": width, "height": height})
                page.wait_for_timeout(200)
                overflow = page.evaluate(
                    "() => document.documentElement.scrollWidth"
                    " - document.documentElement.clientWidth"
                )
                assert overflow <= 0, f"{scheme} {name}: scrolls sideways by {overflow}px"
                shot = tmp_path / f"explain-{scheme}-{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 0
        page.emulate_media(color_scheme="light")
        page.set_viewport_size({"width": 1280, "height": 900})

        # ---- a refused explanation: its message, the prediction stays
        refusal = {"error": {"code": "explain_queue_full", "status": 429,
                             "message": "the explanation queue is full"}}  # fmt: skip
        page.route(
            "**/explain?*",
            lambda route: route.fulfill(status=429, headers={"Retry-After": "3"}, json=refusal),
        )
        select.select_option(str(expected["target"]))
        expect(page.locator("#explain-error")).to_be_visible()
        expect(page.locator("#explain-error")).to_contain_text("the explanation queue is full")
        expect(page.locator("#explain-error")).to_contain_text("3 s")
        expect(app).to_have_attribute("data-explain-state", "error")
        expect(page.locator("#results")).to_be_visible()
        expect(page.locator("#predicted-label")).to_have_text(predicted)
        page.unroute("**/explain?*")
        page.click("#explain-retry")
        expect(app).to_have_attribute("data-explain-state", "ready", timeout=TIMEOUT_MS)
        expect(page.locator("#explain-error")).to_be_hidden()

        assert problems == [], problems
    finally:
        page.close()
