"""What a rollout costs /predict: throughput and latency with no rollout, with a 1 % and
a 100 % shadow share, and the memory of two versions loaded at once.

    python bench/rollout_overhead.py [--model seednet] [--stable 2] [--candidate 1]
                                     [--backend torchscript] [--duration 15] [--concurrency 4]

Copies the model's versions from ``models/`` into a temporary registry (nothing is
written to ``models/``), builds their exports there, and starts the service as a user
does (``python -m service``, one worker, CPU, explanations off, on a free loopback port):

1. **before**: this repository's ``main`` branch (``git archive``: the service without
   rollouts), serving ``--stable``;
2. **no rollout**: this checkout, serving ``--stable``;
3. **shadow 1 %** and 4. **shadow 100 %**: this checkout, with a rollout of ``--candidate``
   started through the admin route (a rule that never decides, so the step stays).

Each phase: ``--concurrency`` closed-loop clients send one real CIFAR-10 test JPEG per
request for ``--duration`` seconds. The load generator shares the host, so the figures
compare the phases with each other. Prints a table with the host (lscpu's model name,
CPUs, load average), the date, and the service's resident memory at the end of each phase
(VmRSS) and its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import httpx
from hostinfo import cpu_model, free_port  # (bench/ is on the path when run as a script)

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
NEVER = {"min_samples": 10**9}  # the step never gathers its samples: no decision


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    return found.get("VmRSS", float("nan")), found.get("VmHWM", float("nan"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_service(code: Path, registry: Path, args: argparse.Namespace) -> tuple:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SEEDNET_")},
        "SEEDNET_REGISTRY_ROOT": str(registry),
        "SEEDNET_MODEL_NAME": args.model,
        "SEEDNET_MODEL_REF": "production",
        "SEEDNET_BACKEND": args.backend,
        "SEEDNET_DEVICE": "cpu",
        "SEEDNET_PORT": str(port),
        "SEEDNET_EXPLAIN": "off",
        "SEEDNET_ADMIN_TOKEN": TOKEN,
        "SEEDNET_ACCESS_LOG": "false",
        "SEEDNET_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=code, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not become ready")


async def load(url: str, images: list[bytes], duration: float, concurrency: int) -> dict:
    times: list[float] = []
    errors = 0
    versions: set[str] = set()
    end = time.monotonic() + duration

    async def client_loop(client: httpx.AsyncClient, k: int) -> None:
        nonlocal errors
        i = k
        while time.monotonic() < end:
            t0 = time.perf_counter()
            r = await client.post("/predict", files={"file": ("a.jpg", images[i % len(images)])})
            times.append(time.perf_counter() - t0)
            if r.status_code == 200:
                versions.add(r.json()["model"]["version"])
            else:
                errors += 1
            i += concurrency

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(client_loop(client, k) for k in range(concurrency)))
    return {
        "rps": len(times) / duration,
        "p50": percentile(times, 0.5),
        "p99": percentile(times, 0.99),
        "errors": errors,
        "versions": ",".join(sorted(versions)),
    }


def start_rollout(url: str, candidate: str, percent: float) -> None:
    body = {"candidate": candidate, "steps": [{"mode": "shadow", "percent": percent}]}
    r = httpx.post(f"{url}/models/{ARGS.model}/rollout", json=body | {"rule": NEVER},
                   headers=ADMIN, timeout=300)  # fmt: skip
    if r.status_code != 200:
        raise SystemExit(f"rollout start: {r.status_code} {r.text}")
    # the candidate is loaded (and its shadow share applied) once /models says so
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        block = httpx.get(f"{url}/models", timeout=30).json()["rollout"]
        if block and block["candidate_loaded"]:
            return
        time.sleep(0.2)
    raise SystemExit("the candidate was not loaded")


def abort_rollout(url: str) -> None:
    r = httpx.post(f"{url}/models/{ARGS.model}/rollout/abort", json={}, headers=ADMIN, timeout=60)
    if r.status_code != 200:
        raise SystemExit(f"rollout abort: {r.status_code} {r.text}")


def shadow_counts(url: str) -> str:
    evidence = httpx.get(f"{url}/models/{ARGS.model}/rollout", timeout=30).json()["evidence"]
    shadow = (evidence or {}).get("shadow") or {}
    return f"{shadow.get('compared', 0)} compared, {shadow.get('dropped', 0)} dropped"


def main_branch_code(into: Path) -> Path:
    """This repository's main branch as files (the service before rollouts)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "main"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    files = sorted((ARGS.data / "test").rglob("*.jpg"))[::97][:64]
    images = [f.read_bytes() for f in files]
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    rows: list[tuple[str, dict, str, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        registry = Path(tmp) / "models"
        shutil.copytree(REPO / "models" / ARGS.model, registry / ARGS.model)
        # every export built first, so no phase's memory includes building one
        subprocess.run(
            [sys.executable, "-m", "service.registry_cli", "--root", str(registry), "materialize"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        if not ARGS.skip_main:
            code = main_branch_code(Path(tmp) / "main")
            proc, url = start_service(code, registry, ARGS)
            try:
                r = asyncio.run(load(url, images, ARGS.duration, ARGS.concurrency))
                rows.append(("before (main, no rollouts)", r, "-", memory_mib(proc.pid)))
            finally:
                proc.terminate()
                proc.wait(60)
        proc, url = start_service(REPO, registry, ARGS)
        try:
            r = asyncio.run(load(url, images, ARGS.duration, ARGS.concurrency))
            rows.append(("no rollout", r, "-", memory_mib(proc.pid)))
            for percent in (1, 100):
                start_rollout(url, ARGS.candidate, percent)
                r = asyncio.run(load(url, images, ARGS.duration, ARGS.concurrency))
                shadow = shadow_counts(url)
                rows.append((f"shadow {percent} %", r, shadow, memory_mib(proc.pid)))
                abort_rollout(url)
        finally:
            proc.terminate()
            proc.wait(60)
    load_after = os.getloadavg()

    print(
        f"\n{ARGS.model}@{ARGS.stable} serving, {ARGS.model}@{ARGS.candidate} the candidate; "
        f"{ARGS.backend}/cpu, 1 worker; /predict, {ARGS.concurrency} clients, "
        f"{ARGS.duration:g} s per phase"
    )
    print(
        f"host: {cpu_model()}, {os.cpu_count()} CPUs; {started:%Y-%m-%d %H:%M} UTC; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    header = (
        f"{'phase':<27} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'answered by':>11}  {'RSS MiB':>7} {'peak MiB':>8}  shadow runs"
    )
    print(header)
    for name, r, shadow, (rss, peak) in rows:
        print(
            f"{name:<27} {r['rps']:>6.1f} {r['p50'] * 1000:>7.1f} {r['p99'] * 1000:>7.1f} "
            f"{r['errors']:>6} {r['versions']:>11}  {rss:>7.0f} {peak:>8.0f}  {shadow}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seednet")
    parser.add_argument("--stable", default="2", help="the version production names")
    parser.add_argument("--candidate", default="1")
    parser.add_argument("--backend", default="torchscript")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "cifar10")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--skip-main", action="store_true", help="no 'before' phase")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()
    main()
