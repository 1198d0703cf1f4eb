"""A real S3 API server on loopback for the object-store tests, and fake credentials.

The server is moto's (``tests/objectstore/s3_server.py``) in its own process, spoken to
over HTTP by the real client stack (s3fs, aiobotocore, botocore). Credentials are fake
and exist only in the environment of these tests and of the processes they start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("s3fs", reason="the object-store tests need s3fs (dev extra)")
pytest.importorskip("moto", reason="the object-store tests need moto[server] (dev extra)")


class S3Server:
    """moto's S3 API in a subprocess on 127.0.0.1; ``stop`` kills it (the store goes down)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.objectstore.s3_server", str(self.port or 0)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the S3 test server did not start")
        self.port = int(line)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs: the endpoint and fake credentials (no config files)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key-never-logged",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 variables set for this test (and returned, for subprocesses)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def make_bucket(env: dict[str, str]) -> str:
    import fsspec

    bucket = f"seednet-{uuid.uuid4().hex[:12]}"
    fs = fsspec.get_filesystem_class("s3")(
        skip_instance_cache=True, endpoint_url=env["AWS_ENDPOINT_URL"]
    )
    fs.mkdir(bucket)
    return bucket


@pytest.fixture
def s3_root(s3_env: dict[str, str]) -> str:
    """A fresh bucket on the test server; the registry root ``s3://<bucket>/registry``."""
    return f"s3://{make_bucket(s3_env)}/registry"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
