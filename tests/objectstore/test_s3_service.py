"""Two `python -m service` processes serving one model from an S3 bucket (moto on loopback).

What a cluster does with an object-store registry: replicas on their own ports, each with
its own local cache, following ``production``; a promote made with the CLI reaches both
while they serve, and a store that goes down stops nothing but registry work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, bound_socket, wait_until
from tests.objectstore.conftest import S3Server, make_bucket

SECRET = "test-secret-key-never-logged"
POLL_S = 1


def _start_service(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    sock = bound_socket()  # a free port; released just before the service binds it
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env={**os.environ, **env, "SEEDNET_PORT": str(port), "SEEDNET_HOST": "127.0.0.1"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _served_version(url: str) -> str | None:
    try:
        answer = httpx.get(f"{url}/health/ready", timeout=5)
    except httpx.HTTPError:
        return None
    return answer.json()["model"]["version"] if answer.status_code == 200 else None


class Load:
    """A few clients posting a real image to every server until stopped (bounded)."""

    def __init__(self, urls: list[str], image: bytes, clients_per_url: int = 2) -> None:
        self.urls, self.image = urls, image
        self.statuses: Counter[str] = Counter()
        self.slowest_s = 0.0  # printed, not asserted: a busy machine's timings vary
        self.versions: dict[str, set[str]] = {url: set() for url in urls}
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(url,), daemon=True)
            for url in urls
            for _ in range(clients_per_url)
        ]

    def _client(self, url: str) -> None:
        with httpx.Client(timeout=60) as client:
            for _ in range(5000):  # bounded, whatever happens
                if self.stop.is_set():
                    return
                try:
                    started = time.monotonic()
                    r = client.post(f"{url}/predict", files={"file": ("cat.jpg", self.image)})
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                    self.statuses[str(r.status_code)] += 1
                    if r.status_code == 200:
                        self.versions[url].add(r.json()["model"]["version"])
                except httpx.HTTPError as e:
                    self.statuses[type(e).__name__] += 1
                time.sleep(0.02)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


@pytest.mark.slow
def test_two_services_follow_the_bucket_and_survive_the_store_going_down(
    tmp_path: Path, tiny_run: Path, tiny_run_2: Path, cifar_dir: Path, monkeypatch
) -> None:
    from training.publish import publish_run

    server = S3Server().start()  # its own: this test stops it
    procs: list[subprocess.Popen] = []
    try:
        env = server.env()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        root = f"s3://{make_bucket(env)}/models"
        monkeypatch.setenv("SEEDNET_REGISTRY_CACHE", str(tmp_path / "publisher-cache"))
        publish_run(tiny_run, "tiny", root, alias="production")
        publish_run(tiny_run_2, "tiny", root)

        service_env = {
            **env,
            "SEEDNET_REGISTRY_ROOT": root,
            "SEEDNET_MODEL_NAME": "tiny",
            "SEEDNET_BACKEND": "torchscript",
            "SEEDNET_DEVICE": "cpu",
            "SEEDNET_ALIAS_POLL_S": str(POLL_S),
            "SEEDNET_MATERIALIZE_EXPORTS": "false",  # the exports come from the bucket
            "SEEDNET_ACCESS_LOG": "false",
        }
        urls = []
        for i in range(2):
            cache = tmp_path / f"replica-{i}-cache"
            proc, url = _start_service(
                {**service_env, "SEEDNET_REGISTRY_CACHE": str(cache)}, tmp_path / f"log-{i}"
            )
            procs.append(proc)
            urls.append(url)
        for proc, url in zip(procs, urls, strict=True):
            wait_until(lambda u=url, p=proc: p.poll() is None and _served_version(u), 300, 0.2)
            assert _served_version(url) == "1"
        for i in range(2):  # each replica verified its own copy into its own cache
            assert list((tmp_path / f"replica-{i}-cache").rglob("model.ts"))

        image = next((cifar_dir / "test" / "cat").iterdir()).read_bytes()
        with Load(urls, image) as load:
            time.sleep(2)
            promote = subprocess.run(
                [sys.executable, "-m", "service.registry_cli", "--root", root]
                + ["promote", "tiny", "2"],
                cwd=REPO,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert promote.returncode == 0, promote.stderr
            moved = time.monotonic()
            for url in urls:
                wait_until(lambda u=url: _served_version(u) == "2", 120, 0.1, f"{url} on v2")
            reached_s = time.monotonic() - moved
            time.sleep(2)  # served by v2 for a while, still under load
        print(
            f"promote reached both replicas in {reached_s:.1f} s; requests: {load.statuses}, "
            f"slowest {load.slowest_s:.2f} s"
        )
        assert set(load.statuses) == {"200"}, load.statuses  # 0 failed requests
        assert all(v == {"1", "2"} for v in load.versions.values()), load.versions
        # The swap itself takes a model load; detection is one poll.
        assert reached_s < POLL_S + 30

        server.stop()  # the store goes down: serving goes on
        with Load(urls, image) as load:
            time.sleep(4 * POLL_S)
        print(f"store down: requests {load.statuses}, slowest {load.slowest_s:.2f} s")
        assert set(load.statuses) == {"200"} and load.statuses["200"] > 10, load.statuses
        for url in urls:
            live = httpx.get(f"{url}/health/live", timeout=5)
            assert live.status_code == 200
            assert _served_version(url) == "2"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()
    logs = "".join((tmp_path / f"log-{i}").read_text() for i in range(2))
    assert SECRET not in logs and env["AWS_ACCESS_KEY_ID"] not in logs
