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

CHROMIUM = Path("/usr/bin/chromium")
CAT_IMAGE = Path(__file__).resolve().parents[2].parent / "shared/cifar10/test/cat/0000.jpg"
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

pytestmark = [
    pytest.mark.browser,
    # Checked before any fixture runs, so a missing browser does not start the service.
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is missing: install Debian's chromium to run browser tests",
    ),
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium to run browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
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


def _valid_rows(rows, blocks: int) -> bool:
    return (
        isinstance(rows, list)
        and len(rows) >= blocks
        and all(isinstance(r, list) and all(isinstance(x, (int, float)) for x in r) for r in rows)
    )


def test_attention_page(live_server: str, browser, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    if not CAT_IMAGE.exists():
        pytest.skip(f"test image {CAT_IMAGE} is missing")
    base = live_server.rstrip("/")

    # What the API says about the same file; the page must show exactly this.
    resp = _predict(base, CAT_IMAGE.name, CAT_IMAGE.read_bytes(), "image/jpeg")
    assert resp.status_code == 200, resp.text
    api = resp.json()
    expected = api["predictions"][0]
    ref_resp = httpx.get(f"{base}/attention/reference", timeout=60)
    assert ref_resp.status_code in (200, 404), ref_resp.text
    reference = ref_resp.json() if ref_resp.status_code == 200 else None

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
        page.set_input_files("#file-input", str(CAT_IMAGE))
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
        typical_rows = None
        if reference is not None:
            by_pred = reference.get("by_predicted_class") or {}
            if _valid_rows(by_pred.get(expected["label"]), 7):
                typical_rows = by_pred[expected["label"]]
                expect(page.locator("#legend-typical")).to_have_text(f"typical {expected['label']}")
        if typical_rows is not None:
            for got, typ in zip(shown_att, typical_rows[: len(shown_att)], strict=True):
                assert len(got["typical"]) == 2
                for t_page, t_ref in zip(got["typical"], typ, strict=True):
                    assert math.isclose(t_page, t_ref, abs_tol=1e-6)
                unusual = any(
                    abs(w - t) > UNUSUAL_THRESHOLD
                    for w, t in zip(got["weights"], got["typical"], strict=True)
                )
                assert got["unusual"] == unusual
                assert ("Unusual" in got["text"]) == unusual
        elif reference is None:
            # No reference data: the comparison is simply left out.
            assert all(not got["typical"] and not got["unusual"] for got in shown_att)
            expect(page.locator("#legend-typical")).to_have_count(0)
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
