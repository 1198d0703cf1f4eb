"""Screenshots of the /attention page with explanations, for docs/explanations/.

Serves a registry version on a loopback port (the service as it runs, explanations on),
opens /attention in Debian's headless Chromium (Playwright), uploads one CIFAR-10 test
image enlarged to 4:3 (so the heat map over the upload shows how it covers the picture),
and saves four screenshots: light and dark, desktop (1280 px) and phone (390 px), each
reduced to a 256-colour palette to keep the files small::

    python scripts/page_screenshots.py                       # seednet@production, a cat
    python scripts/page_screenshots.py --model seednet-small --image test/dog/0003.jpg
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's service, whatever is installed
CHROMIUM = "/usr/bin/chromium"
SHOTS = [
    ("light", 1280, 900, "desktop"),
    ("dark", 1280, 900, "desktop"),
    ("light", 390, 844, "phone"),
    ("dark", 390, 844, "phone"),
]


def serve(registry: Path, model: str):
    import uvicorn

    from service.app import create_app
    from service.config import Settings
    from service.frontends.http.server import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    settings = Settings(
        registry_root=registry,
        model_name=model,
        host="127.0.0.1",
        port=sock.getsockname()[1],
        device="cpu",
        explain="on",
    )
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the service did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{settings.port}"


def shrink(path: Path) -> None:
    """A 256-colour palette PNG (text and flat UI survive it; about a third of the size)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="seednet")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "cifar10")
    parser.add_argument("--image", default="test/cat/0000.jpg", help="relative to --data")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "explanations")
    args = parser.parse_args()

    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="seednet-page-"))
    upload = scratch / f"{Path(args.image).parent.name or 'upload'}.png"  # (cat.png)
    source = Image.open(args.data / args.image).convert("RGB")
    source.resize((256, 192), Image.Resampling.BICUBIC).save(upload)
    server, thread, url = serve(args.registry, args.model)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(f"{url}/attention")
            page.set_input_files("#file-input", str(upload))
            expect(page.locator("#app")).to_have_attribute("data-explain-state", "ready")
            for scheme, width, height, name in SHOTS:
                page.emulate_media(color_scheme=scheme)
                page.set_viewport_size({"width": width, "height": height})
                page.wait_for_timeout(500)  # (bars animate)
                path = args.out / f"page-{scheme}-{name}.png"
                page.screenshot(path=str(path), full_page=True)
                shrink(path)
                print(f"{path.relative_to(REPO)}  {path.stat().st_size // 1024} KiB")
            browser.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        server.should_exit = True
        thread.join(30)


if __name__ == "__main__":  # (the explanation worker is spawned: it imports this module)
    main()
