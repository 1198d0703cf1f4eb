"""The service runs under the Deployment's file-system rules: a read-only root file system
where only the Deployment's emptyDir mount paths are writable.

The rendered CPU overlay gives the environment (its ConfigMap, HOME) and the writable
paths (its emptyDir volumeMounts). The service starts in a private mount namespace
(``unshare``) in which ``/`` is remounted read-only and a tmpfs is mounted on each of
those paths, as the kubelet would; it loads the tiny model from a registry copy that is
read-only there, serves /predict and /metrics and shuts down cleanly on SIGTERM. The
harness is shown to bite: the same service asked to build missing exports into the
read-only registry fails to start with the file-system error.

Root only (mount namespaces); runs as root, not uid 10001: read-only mounts bind root
too, and the pod's non-root user is checked on the manifests (test_manifests.py).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from deploy import validate
from tests.conftest import REPO, missing
from tests.image_factory import noise_jpeg

pytestmark = pytest.mark.slow
EXPORTS = ("model.ts", "model.onnx", "exports.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pod(tmp_path_factory) -> dict:
    """The CPU overlay's container environment and its emptyDir mount paths."""
    kubectl = validate.find_kubectl()
    if kubectl is None:
        missing("kubectl not found: scripts/setup.sh dev installs it")
    objects = validate.render(REPO / "deploy/k8s/overlays/cpu", kubectl)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    env = dict(configmap["data"])
    env.update({v["name"]: v["value"] for v in container["env"] if "value" in v})
    env["SEEDNET_INFERENCE_THREADS"] = "2"  # the downward API's value for requests.cpu "2"
    writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs]
    return {"env": env, "writable": writable}


def can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


def hidden_by(paths: list[str]) -> list[str]:
    """What the tmpfs mounts would hide that the service needs (the interpreter, the code)."""
    needed = [Path(sys.prefix).resolve(), Path(sys.executable).resolve(), REPO.resolve()]
    hidden = []
    for mount in map(Path, paths):
        top = mount if mount.exists() else mount.parent  # a missing path: its parent is covered
        hidden += [str(n) for n in needed if n == top or top in n.parents]
    return hidden


def start_read_only(pod: dict, registry: Path, log: Path, **overrides: str):
    """``python -m service`` with / read-only and only the pod's emptyDir paths writable."""
    steps = ["mount --make-rprivate /"]
    for path in pod["writable"]:
        # A mount point must exist; on a read-only root it cannot be created, so a missing
        # path gets a tmpfs on its parent (inside this namespace only) and is made there.
        if Path(path).exists():
            steps.append(f"mount -t tmpfs -o mode=1777 tmpfs {shlex.quote(path)}")
        else:
            parent = str(Path(path).parent)
            steps.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(parent)}")
            steps.append(f"mkdir -m 1777 {shlex.quote(path)}")
    steps.insert(1, "mount -o remount,bind,ro /")
    env = {**pod["env"], **overrides}
    env.update(
        SEEDNET_REGISTRY_ROOT=str(registry),
        PATH="/usr/bin:/bin",
        PYTHONUNBUFFERED="1",
        LANG="C.UTF-8",
        MPLCONFIGDIR="/tmp/matplotlib",  # as the image sets it
    )
    command = (
        " && ".join(steps)
        + " && exec env -i "
        + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    )
    command += f" {shlex.quote(sys.executable)} -m service"
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


@pytest.fixture
def registry_copy(served_registry):
    """tiny's registry on the root file system (read-only in the namespace), not under
    /tmp (a tmpfs there). /var/tmp is the root file system's scratch folder."""
    if not can_unshare():
        pytest.skip("needs root and mount namespaces (unshare --mount)")
    folder = Path(tempfile.mkdtemp(prefix="seednet-ro-", dir="/var/tmp"))
    shutil.copytree(served_registry, folder / "registry")
    yield folder / "registry"
    shutil.rmtree(folder, ignore_errors=True)


def test_serves_on_a_read_only_root_with_the_pods_writable_paths(pod, registry_copy, tmp_path):
    assert sorted(pod["writable"]) == ["/home/seednet", "/tmp"]
    hidden = hidden_by(pod["writable"])
    if hidden:
        pytest.skip(f"the tmpfs mounts would hide {hidden}")
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "service.log"
    proc = start_read_only(
        pod,
        registry_copy,
        log,
        SEEDNET_MODEL_NAME="tiny",
        SEEDNET_HOST="127.0.0.1",
        SEEDNET_PORT=str(port),
        SEEDNET_GRPC_PORT=str(grpc_port),
        SEEDNET_DEVICE="cpu",
    )
    try:
        assert wait_ready(proc, url, timeout=240), log.read_text()[-3000:]
        r = httpx.post(f"{url}/predict", files={"file": ("a.jpg", noise_jpeg())}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "tiny"
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'seednet_model_info{backend="' in metrics
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    text = log.read_text()
    # uvicorn re-raises the SIGTERM it handled once shut down: -15 is the clean exit
    assert code in (0, -signal.SIGTERM), text[-3000:]
    assert "Application shutdown complete." in text, text[-3000:]
    # Nothing tried to write outside the writable paths (ONNX Runtime and OpenVINO keep
    # an id file under $HOME: with $HOME read-only they say so in the log).
    for complaint in ("Read-only file system", "allow write access", "Permission denied"):
        assert complaint not in text, text[-3000:]


def test_the_harness_really_makes_the_root_read_only(pod, registry_copy, tmp_path):
    """Exports missing and SEEDNET_MATERIALIZE_EXPORTS=true: the service must write into
    the registry, which the harness made read-only, so start-up fails with that error."""
    for version in (p for p in registry_copy.glob("tiny/*") if p.is_dir()):
        for name in EXPORTS:
            (version / name).unlink(missing_ok=True)
    port = free_port()
    log = tmp_path / "service.log"
    proc = start_read_only(
        pod,
        registry_copy,
        log,
        SEEDNET_MODEL_NAME="tiny",
        SEEDNET_HOST="127.0.0.1",
        SEEDNET_PORT=str(port),
        SEEDNET_GRPC_PORT=str(free_port()),
        SEEDNET_DEVICE="cpu",
        SEEDNET_BACKEND="torchscript",
        SEEDNET_MATERIALIZE_EXPORTS="true",
    )
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0, text[-3000:]
    assert "read-only file system" in text.lower(), text[-3000:]
