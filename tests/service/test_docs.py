"""/docs and /redoc work offline: every asset comes from the service itself.

The first test reads the pages' HTML and fetches every URL in it; the browser test
opens both pages in headless Chromium with every request to another host refused,
and checks that the API really renders (the v2 inference route is listed).
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.service.test_attention_page import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

TITLE = "SeedNet inference service"
#: ReDoc's bundle links its own footer logo ("API docs by Redocly") from its CDN; offline
#: that one image is missing and nothing else changes.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_refer_only_to_local_assets_that_load(server, page):
    r = httpx.get(server.url + page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text), "refers to another host"
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", r.text)
    script = "swagger-ui-bundle.js" if page == "/docs" else "redoc.standalone.js"
    assert any(u.endswith(script) for u in urls), urls
    assert "/openapi.json" in urls
    for url in urls:
        assert url.startswith("/"), url
        asset = httpx.get(server.url + url)
        assert asset.status_code == 200 and asset.content, url


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


@pytest.mark.browser
@pytest.mark.parametrize(
    ("page", "rendered"),
    [
        ("/docs", ".swagger-ui .opblock-summary-path[data-path='/v2/models/{name}/infer']"),
        ("/redoc", "h2:has-text('Inference: images (UINT8)')"),
    ],
)
def test_docs_render_with_no_other_host_reachable(browser, server, page, rendered):
    tab = browser.new_page()
    elsewhere: list[str] = []

    def only_the_service(route):
        url = route.request.url
        if url.startswith(server.url + "/") or url.startswith("data:"):
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    tab.route("**/*", only_the_service)
    try:
        tab.goto(server.url + page, timeout=TIMEOUT_MS)
        tab.wait_for_selector(rendered, timeout=TIMEOUT_MS)
        assert TITLE in tab.content()
    finally:
        tab.close()
    assert set(elsewhere) <= ({REDOC_LOGO} if page == "/redoc" else set())
