"""Shared fixtures: real data slices, tiny really-trained models, a real registry and server.

Nothing here is mocked: the tiny models are trained for one epoch on 10 images per class,
published to a registry in a temporary folder (exports built and verified), and served
by a real uvicorn on a loopback port.

The data is found one way, as the CLI finds it: ``$SEEDNET_CIFAR10``, else
``../shared/cifar10`` beside the checkout. Under CI (``CI=true``) a missing data folder
or browser fails the run with the reason; locally those tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from registry import Registry

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Variables that steer the test run itself; every other SEEDNET_* of the caller's shell is
# dropped, so a developer's exported settings cannot change what the tests serve.
TEST_RUN_VARIABLES = {"SEEDNET_CIFAR10", "SEEDNET_SKIP_SLOW"}
for _name in [n for n in os.environ if n.startswith("SEEDNET_")]:
    if _name not in TEST_RUN_VARIABLES:
        del os.environ[_name]


def data_dir() -> Path:
    from training.data import default_source

    path = Path(default_source())
    return path if path.is_absolute() else (REPO / path).resolve()


CIFAR = data_dir()


def missing(reason: str) -> None:
    """Skip locally; fail under CI, where a missing prerequisite is a broken setup."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails the run)", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SEEDNET_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="SEEDNET_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    if not (CIFAR / "test").is_dir():
        missing(f"CIFAR-10 JPEG copy not found at {CIFAR} (set SEEDNET_CIFAR10)")
    return CIFAR


def train_tiny(out: Path, data: Path, seed: int) -> Path:
    """seednet-small trained for one epoch on 10 images per class (CPU, ~10 s)."""
    from training.train import TrainSettings, train

    train(
        TrainSettings(
            recipe="seed",
            arch="seednet-small",
            data=str(data),
            out=str(out),
            epochs=1,
            batch_size=32,
            device="cpu",
            limit_per_class=10,
            seed=seed,
            # plain versions (two outputs): what the service's tests serve
            calibration_fraction=0.0,
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar_dir) -> Path:
    return train_tiny(tmp_path_factory.mktemp("tiny-run"), cifar_dir, seed=1)


@pytest.fixture(scope="session")
def tiny_run_2(tmp_path_factory, cifar_dir) -> Path:
    """A second tiny model (another seed): different weights, different outputs."""
    return train_tiny(tmp_path_factory.mktemp("tiny-run-2"), cifar_dir, seed=2)


@pytest.fixture(scope="session")
def served_registry(tmp_path_factory, tiny_run, tiny_run_2) -> Path:
    """A registry with tiny@1 (production) and tiny@2 (other weights), exports built."""
    from training.publish import publish_run

    root = tmp_path_factory.mktemp("registry")
    publish_run(tiny_run, "tiny", root, alias="production")
    publish_run(tiny_run_2, "tiny", root)
    return root


def bound_socket() -> socket.socket:
    """A listening socket on a free loopback port, handed to uvicorn as it is: no race
    between choosing a port and binding it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def wait_until(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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


class LiveServer:
    """uvicorn serving ``create_app(settings)`` on 127.0.0.1 in a background thread."""

    def __init__(self, **overrides) -> None:
        from service.app import create_app
        from service.config import Settings
        from service.frontends.http.server import uvicorn_config

        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        # Explanations start their worker process at the first one (SEEDNET_EXPLAIN=lazy)
        # unless a test asks otherwise: most servers here never explain, and each worker
        # would import torch again on a busy machine.
        overrides = {"explain": "lazy", **overrides}
        self.settings = Settings(host="127.0.0.1", port=self.port, **overrides)
        self.app = create_app(self.settings)
        # The service's own uvicorn settings (timeouts, header deadline), quieter logs.
        config = uvicorn_config(self.app, self.settings, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC server (start it with ``grpc_port=0``: any free port)."""
        port = self.app.state.service.grpc_port
        if port is None:
            raise RuntimeError("this server runs no gRPC server (pass grpc_port=0)")
        return f"127.0.0.1:{port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped during start-up")
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the server did not become ready in time")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="session")
def server(served_registry) -> Iterator[LiveServer]:
    """The shared server: never reloaded or promoted by a test (those get their own)."""
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
        grpc_port=0,
        explain="on",  # the explain tests and the page's
        # bursts of 64 requests on a busy CI machine must not meet admission control
        # (tests/service/test_admission.py and test_conformance.py test it on their own)
        queue_timeout_ms=60_000,
    ) as srv:
        yield srv


@pytest.fixture(scope="session")
def live_server(server) -> str:
    """Base URL of the real service (used by the browser test)."""
    return server.url


@pytest.fixture(scope="session")
def golden_1(served_registry) -> dict:
    """tiny@1's golden set: 64 real test images and the eager outputs recorded at publish."""
    from safetensors.torch import load_file

    return {
        k: v.numpy()
        for k, v in load_file(str(served_registry / "tiny/1/golden.safetensors")).items()
    }


def run_training_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="session")
def calibrated(served_registry, cifar_dir, tmp_path_factory):
    """tiny@1 calibrated into a copy of the served registry: (registry, first, second run)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    root = tmp / "models"
    shutil.copytree(served_registry, root)
    from training.ood_sets import PROCEDURAL, build_ood_sets

    build_ood_sets(tmp / "ood", per_set=40, sets=PROCEDURAL)
    args = [
        "calibrate",
        "tiny@1",
        "--root",
        str(root),
        "--data",
        str(cifar_dir),
        "--ood-sets",
        str(tmp / "ood"),
        "--cache",
        str(tmp / "cache"),
        "--test-limit-per-class",
        "10",
        "--max-drop",
        "100",  # a one-epoch model: the gate's figures are checked, not its verdict
        "--shift-per-class",
        "2",
        "--register",
    ]
    first = run_training_cli(*args)
    second = run_training_cli(*args)  # a retried publish
    return Registry(root), first, second
