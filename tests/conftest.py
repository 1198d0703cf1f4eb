"""Shared fixtures: real data slices, a tiny really-trained model, a real registry and server.

Nothing here is mocked: the tiny model is trained for one epoch on 10 images per class,
published to a registry in a temporary folder (exports built and verified), and served
by a real uvicorn on a loopback port.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("SEEDNET_CIFAR10", REPO.parent / "shared" / "cifar10"))
ADMIN_TOKEN = "test-admin-token"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SEEDNET_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="SEEDNET_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (CIFAR / "test").is_dir():
        pytest.skip(f"CIFAR-10 JPEG copy not found at {CIFAR}")
    return CIFAR


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar_dir) -> Path:
    """seednet-small trained for one epoch on 10 images per class (CPU, ~10 s)."""
    from training.train import TrainSettings, train

    out = tmp_path_factory.mktemp("tiny-run")
    train(
        TrainSettings(
            recipe="seed",
            arch="seednet-small",
            data=str(cifar_dir),
            out=str(out),
            epochs=1,
            batch_size=32,
            device="cpu",
            limit_per_class=10,
            seed=1,
        )
    )
    return out


@pytest.fixture(scope="session")
def served_registry(tmp_path_factory, tiny_run) -> Path:
    """A registry with tiny@1 (production) and tiny@2, exports materialised."""
    from training.publish import publish_run

    root = tmp_path_factory.mktemp("registry")
    publish_run(tiny_run, "tiny", root, alias="production")
    publish_run(tiny_run, "tiny", root, force=True)  # same run: a second version on purpose
    return root


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` (a folder) really read-only for this process, then writable again.

    Not root: remove the write bits. Root ignores those, so a read-only bind mount of the
    folder onto itself (needs CAP_SYS_ADMIN); the test is skipped where neither works.
    """
    if os.geteuid() != 0:
        folders = [path, *(p for p in path.rglob("*") if p.is_dir())]
        modes = {p: p.stat().st_mode for p in folders}
        for p in folders:
            p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield
        finally:
            for p in folders:
                p.chmod(modes[p])
        return
    mount = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot make a folder read-only as root here: {mount.stderr.decode()}")
    try:
        remount = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, check=False
        )
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.decode()}")
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``create_app(settings)`` on 127.0.0.1 in a background thread."""

    def __init__(self, **overrides) -> None:
        from service.app import create_app
        from service.config import Settings
        from service.server import uvicorn_config

        self.port = free_port()
        self.settings = Settings(host="127.0.0.1", port=self.port, **overrides)
        self.app = create_app(self.settings)
        # The service's own uvicorn settings (timeouts, header deadline), quieter logs.
        config = uvicorn_config(self.app, self.settings, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 300
        while time.time() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped during start-up")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready in time")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server(served_registry) -> Iterator[LiveServer]:
    with LiveServer(
        registry_root=served_registry,
        model_name="tiny",
        device="cpu",
        backend="torchscript",
        admin_token=ADMIN_TOKEN,
        max_batch_wait_ms=5,
        max_images_per_request=40,
        max_upload_bytes=2_000_000,
        max_image_pixels=4_000_000,
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def live_server(server) -> str:
    """Base URL of the real service (used by the browser test)."""
    return server.url
