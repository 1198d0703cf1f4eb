"""Which wheels a PyTorch CUDA image lacks to run the service, downloaded for its Python
(part of scripts/gpu_wheelhouse.sh; run it through that script).

    python scripts/gpu_wheelhouse.py --dest .whl/wheels [--python-version 3.12]
                                     [--pin-python .venv/bin/python] [--no-repack]

The list is derived, not hand-kept:

1. ``[project.dependencies]`` of pyproject.toml, plus the ``uvicorn[standard]`` pieces
   the service uses, minus what the image already holds (``IMAGE_HAS``: the package list
   of the image the job was written for, torch 2.11 + CUDA 13 on Python 3.12, read on
   2026-11-17; put your image's ``pip list`` there) and minus ``SKIP`` (with the reason);
2. plus ``FORCE``: packages the image has, but at a version we cannot rely on;
3. then the closure: every ``Requires-Dist`` (no extra, markers evaluated for the
   target Python on Linux) of every downloaded wheel that is neither in the image nor
   downloaded yet.

Versions are pinned to what ``--pin-python`` (the development venv, where the test suite
passes) has installed; a package it lacks is taken at its newest version. Wheels over
256 KiB are recompressed with LZMA (same files, same RECORD hashes: pip installs them as
usual), because the wheelhouse was sized to fit, with the working tree, in a 64 MiB
transfer. The list, the reason for each entry and the sizes go to ``<dest>/../WHEELS.txt``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ModuleNotFoundError:  # pip always carries a copy
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent

# The packages of the PyTorch CUDA image the job was written for, as listed on 2026-11-17.
_IMAGE_LIST = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
    protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
    sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
IMAGE_HAS = frozenset(_IMAGE_LIST.split())

# In pyproject.toml, deliberately left out of the wheelhouse.
SKIP = {
    "torch": "the image's 2.11 (CUDA 13) build is the one that drives the GPU",
    "torchvision": "the image's build matches its torch",
    "onnxruntime-gpu": "255.6 MB for cp312 (1.31.1), 4x the 64 MiB the wheelhouse is sized "
    "for: the onnx backend gets the image's onnxruntime",
    # uvicorn[standard] pieces the service does not use
    "websockets": "no WebSocket routes",
    "watchfiles": "only for --reload",
}

# The image has these, at versions not known in advance: the wheelhouse holds the tested ones.
FORCE = {
    "grpcio": "the committed gRPC stubs refuse grpcio < 1.85.1 at import",
    "protobuf": "the committed pb2 needs protobuf >= 7.35.1, < 8",
    "typing-extensions": "pydantic 2.14 needs >= 4.16",
    "anyio": "starlette 1.x needs anyio >= 4",
}

# Extras the service relies on, beyond the plain names in pyproject.toml.
EXTRAS = {"uvicorn": "standard"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(python: str | None) -> dict[str, str]:
    if not python:
        return {}
    code = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"warning: no pins from {python}: {exc}", file=sys.stderr)
        return {}
    return {norm(k): v for k, v in json.loads(out.stdout).items()}


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def requirements_of(path: Path, env: dict, extra: str | None = None) -> list[Requirement]:
    out = []
    for line in wheel_metadata(path).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None:
            if extra is None:
                out.append(req)
            continue
        with_extra = req.marker.evaluate({**env, "extra": extra or ""})
        without = req.marker.evaluate({**env, "extra": ""})
        if (extra is None and without) or (extra is not None and with_extra and not without):
            out.append(req)
    return out


def download(names: list[str], pins: dict[str, str], dest: Path, pyver: str) -> None:
    specs = [f"{n}=={pins[n]}" if n in pins else n for n in names]
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--python-version", pyver, "--implementation", "cp",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
        "--platform", "manylinux_2_5_x86_64", "--platform", "manylinux1_x86_64",
        "-d", str(dest), *specs,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def repack_lzma(path: Path, threshold: int = 256 * 1024) -> tuple[int, int]:
    """Recompress a wheel's members with LZMA (contents and RECORD unchanged)."""
    before = path.stat().st_size
    if before < threshold:
        return before, before
    tmp = path.with_suffix(".lzma-tmp")
    with zipfile.ZipFile(path) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zo:
        for info in zi.infolist():
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = zipfile.ZIP_LZMA
            zo.writestr(out, zi.read(info))
    with zipfile.ZipFile(tmp) as z:
        bad = z.testzip()
        if bad is not None:
            raise RuntimeError(f"{tmp}: {bad} does not read back")
    after = tmp.stat().st_size
    if after < before:
        tmp.replace(path)
        return before, after
    tmp.unlink()
    return before, before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, required=True, help="folder for the wheels")
    ap.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    ap.add_argument("--pin-python", help="interpreter whose installed versions are the pins")
    ap.add_argument("--no-repack", action="store_true", help="keep pip's deflate compression")
    args = ap.parse_args(argv)

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = pinned_versions(args.pin_python)
    major, minor = args.python_version.split(".")[:2]
    env = default_environment() | {
        "python_version": f"{major}.{minor}",
        "python_full_version": f"{major}.{minor}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    why: dict[str, str] = {}
    for line in pyproject["project"]["dependencies"]:
        n = norm(Requirement(line).name)
        if n in SKIP:
            continue
        if n in FORCE:
            why[n] = f"pyproject; in the image, but {FORCE[n]}"
        elif n not in IMAGE_HAS:
            why[n] = "pyproject; not in the image"
    for n, reason in FORCE.items():
        why.setdefault(n, f"in the image, but {reason}")

    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("*.whl"):
        stale.unlink()
    done: set[str] = set()
    todo = sorted(why)
    while todo:
        download(todo, pins, args.dest, args.python_version)
        done |= set(todo)
        new: set[str] = set()
        for wheel in args.dest.glob("*.whl"):
            meta = wheel_metadata(wheel)
            owner = norm(meta["Name"])
            reqs = requirements_of(wheel, env)
            if owner in EXTRAS:
                reqs += requirements_of(wheel, env, EXTRAS[owner])
            for req in reqs:
                n = norm(req.name)
                if n in done or n in new or n in IMAGE_HAS or n in SKIP:
                    continue
                new.add(n)
                why[n] = f"needed by {owner}; not in the image"
        todo = sorted(new)

    lines = [f"# wheels for the GPU image (cp{major}{minor}, manylinux x86_64), by reason"]
    total = 0
    for wheel in sorted(args.dest.glob("*.whl")):
        n = norm(wheel_metadata(wheel)["Name"])
        before = after = wheel.stat().st_size
        if not args.no_repack:
            before, after = repack_lzma(wheel)
        total += after
        size = f"{after / 1e6:6.2f} MB"
        if after < before:
            size += f" (pip's: {before / 1e6:.2f})"
        lines.append(f"{wheel.name}  {size}  {why.get(n, '?')}")
    lines.append(f"# total {total / 1e6:.2f} MB in {len(lines) - 1} wheels")
    lines.append("# left out: " + "; ".join(f"{k}: {v}" for k, v in SKIP.items()))
    report = "\n".join(lines)
    (args.dest.parent / "WHEELS.txt").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
