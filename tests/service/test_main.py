"""`python -m service` as an operator runs it: SEEDNET_* variables in, a quiet log out."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest

from tests import image_factory as make
from tests.conftest import REPO, bound_socket, wait_until


def start(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    sock = bound_socket()  # a free port; released just before the service binds it
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env={**os.environ, **env, "SEEDNET_PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def ready(proc: subprocess.Popen, url: str) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the service exited: {proc.stdout.read()}")
    try:
        return httpx.get(f"{url}/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_settings_come_from_seednet_variables_and_the_log_is_one_line_per_phase(
    served_registry, tmp_path
):
    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    for name in ("model.onnx", "model.ts", "exports.json"):  # built at start, quietly
        (root / "tiny/2" / name).unlink()
    proc, url = start(
        {
            "SEEDNET_REGISTRY_ROOT": str(root),
            "SEEDNET_MODEL_NAME": "tiny",
            "SEEDNET_MODEL_REF": "2",
            "SEEDNET_BACKEND": "onnx",
            "SEEDNET_DEVICE": "cpu",
            "SEEDNET_MAX_IMAGES_PER_REQUEST": "2",
            "SEEDNET_ACCESS_LOG": "false",
        }
    )
    try:
        wait_until(lambda: ready(proc, url), 300, 0.1, "the service to be ready")
        info = httpx.get(f"{url}/health/ready").json()["model"]
        one = httpx.post(f"{url}/predict", files={"file": ("a.jpg", make.jpeg())}, timeout=60)
        three = httpx.post(
            f"{url}/predict",
            files=[("files", (f"{i}.jpg", make.jpeg())) for i in range(3)],
            timeout=60,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert info == {"name": "tiny", "version": "2", "backend": "onnx", "device": "cpu"}
    assert one.status_code == 200
    assert three.status_code == 413 and "at most 2" in three.json()["error"]["message"]
    # uvicorn finishes in-flight work, then re-raises SIGTERM (a conventional -15 exit)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    lines = out.splitlines()
    for phase in (
        "verified tiny@2",
        "exports of tiny@2 built and verified in",
        "warmed up tiny@2 in",
        "serving tiny@2 on onnx/cpu",
    ):
        assert sum(phase in line for line in lines) == 1, (phase, out)
    assert "POST /predict" not in out  # SEEDNET_ACCESS_LOG=false
    assert len(lines) < 20, out  # no exporter chatter, no deprecation warnings


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SEEDNET_BACKEND", "tensorflow", "backend"),
        ("SEEDNET_MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("SEEDNET_MODEL_REF", "99", "version 99 of 'tiny' not found"),
    ],
)
def test_a_bad_setting_stops_the_start_with_the_reason(served_registry, variable, value, message):
    proc, _ = start(
        {
            "SEEDNET_REGISTRY_ROOT": str(served_registry),
            "SEEDNET_MODEL_NAME": "tiny",
            variable: value,
        }
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert message in out


@pytest.mark.slow
def test_two_workers_share_one_metrics_view_and_follow_a_promote(served_registry, tmp_path):
    """SEEDNET_WORKERS=2: any worker's /metrics sums both (multiprocess mode), and a
    promote answered by one worker reaches the other through the alias poll."""
    from tests.service.test_service import metric_value

    root = tmp_path / "registry"
    shutil.copytree(served_registry, root)
    proc, url = start(
        {
            "SEEDNET_REGISTRY_ROOT": str(root),
            "SEEDNET_MODEL_NAME": "tiny",
            "SEEDNET_DEVICE": "cpu",
            "SEEDNET_WORKERS": "2",
            "SEEDNET_BACKEND": "torchscript",
            "SEEDNET_ALIAS_POLL_S": "0.5",
            "SEEDNET_ADMIN_TOKEN": "t",
            "SEEDNET_ACCESS_LOG": "false",
        }
    )
    try:
        wait_until(lambda: ready(proc, url), 300, 0.1, "the service to be ready")
        # both workers up: each reports its own model_info series
        wait_until(
            lambda: httpx.get(f"{url}/metrics").text.count("seednet_model_info{") == 2,
            120,
            0.2,
            "two workers",
        )
        with httpx.Client(timeout=60) as client:  # new connections spread over workers
            for _ in range(12):
                r = httpx.post(f"{url}/predict", files={"file": ("a.jpg", make.jpeg())})
                assert r.status_code == 200
            metrics = httpx.get(f"{url}/metrics").text
            promoted = client.post(
                f"{url}/models/tiny/promote",
                json={"version": "2"},
                headers={"authorization": "Bearer t"},
            )

            def everyone_serves_2() -> bool:
                answers = [
                    httpx.post(f"{url}/predict", files={"file": ("a.jpg", make.jpeg())})
                    for _ in range(6)
                ]
                return all(a.json()["model"]["version"] == "2" for a in answers)

            wait_until(everyone_serves_2, 60, 0.5, "both workers to serve tiny@2")
            # each worker reports the model it serves now, and no longer the old one
            info = [
                line
                for line in httpx.get(f"{url}/metrics").text.splitlines()
                if line.startswith("seednet_model_info{")
            ]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert promoted.status_code == 200, promoted.text
    assert metric_value(metrics, "seednet_images_processed_total") == 12
    ok = 'seednet_requests_total{method="POST",protocol="rest",route="/predict",status="200"}'
    assert metric_value(metrics, ok) == 12
    assert out.count("serving tiny@1 on torchscript/cpu") == 2  # one per worker
    assert len(info) == 2 and all('version="2"' in line for line in info), info
