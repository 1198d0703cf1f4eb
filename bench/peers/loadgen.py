"""Closed-loop HTTP load generator shared by every stack in bench/peers (asyncio + aiohttp).

    python loadgen.py --stack NAME --url http://127.0.0.1:PORT/predict --server-pid PID
                      [--concurrency 1,8,64,256] [--duration 20] [--warmup 5]
                      [--images ../shared/cifar10/test] [--count 256] [--out results.jsonl]

For each concurrency level c: c workers share one connection pool (keep-alive, at most c
connections); each sends its next request as soon as the previous one is answered. Every
request is a multipart POST with one CIFAR-10 JPEG in the field ``file`` (the same bodies,
built once, cycled in the same order for every stack). A level warms up for ``--warmup``
seconds, then measures for ``--duration`` seconds: requests that *complete* inside the
measured window count. A level also stops after ``--max-requests`` requests, and no request
waits longer than ``--timeout`` seconds, so every run ends by itself.

Per level it records: req/s (2xx per second of window), p50/p95/p99 latency of 2xx answers
in ms, ``errors`` (non-2xx other than 429/503, timeouts, connection errors), ``rejections``
(429 and 503: the server shedding load; after a rejection or a connection error the worker
waits 10 ms before its next request, so a shedding server is not hammered by a hot loop),
and the peak RSS of the server's process tree
(``rss.py`` samples /proc every 100 ms through warm-up and window; PSS, which splits shared
pages between processes, every 500 ms).

Before the first level it waits (``--ready-timeout``) until one real request succeeds, and
records the label and confidence the stack gives the first image: the same weights must
give the same answer everywhere.

Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
BOUNDARY = "seednet-peers-bench-boundary"
REJECT = {429, 503}


def loopback_only(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise SystemExit(f"refusing non-loopback target {url!r}")


def pick_images(root: Path, count: int) -> list[Path]:
    """``count`` JPEGs, round-robin over the class folders (sorted), deterministic."""
    classes = sorted(d for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"no class folders under {root}")
    files = [sorted(d.glob("*.jpg")) for d in classes]
    picked: list[Path] = []
    i = 0
    while len(picked) < count and any(i < len(f) for f in files):
        picked.extend(f[i] for f in files if i < len(f) and len(picked) < count)
        i += 1
    return picked


def multipart(path: Path) -> bytes:
    return (
        (
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


HEADERS = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def wait_ready(url: str, body: bytes, timeout: float, pid: int | None) -> dict:
    """Retry one real request until it succeeds; return what the stack said about it."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while time.monotonic() < deadline:
            if not alive(pid):
                raise SystemExit(f"server process {pid} exited before it was ready ({last})")
            try:
                async with session.post(url, data=body, headers=HEADERS) as r:
                    text = await r.text()
                    if 200 <= r.status < 300:
                        doc = json.loads(text)
                        if isinstance(doc, dict) and "predictions" in doc:  # the service
                            doc = doc["predictions"][0]
                        return {"label": doc.get("label"), "confidence": doc.get("confidence")}
                    last = f"HTTP {r.status}: {text[:200]}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.5)
    raise SystemExit(f"not ready after {timeout:.0f}s: {last}")


async def run_level(args, bodies: list[bytes], c: int) -> dict:
    sampler = None
    if args.server_pid:
        sampler = subprocess.Popen(
            [sys.executable, str(HERE / "rss.py"), "sample", str(args.server_pid)],
            stdout=subprocess.PIPE,
            text=True,
        )
    counter = 0
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    rejections = 0
    completed_in_window = 0
    start = time.perf_counter()
    t0 = start + args.warmup
    t1 = t0 + args.duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counter, rejections, completed_in_window
        while True:
            now = time.perf_counter()
            if now >= t1 or counter >= args.max_requests:
                return
            body = bodies[counter % len(bodies)]
            counter += 1
            status, kind = None, None
            try:
                async with session.post(args.url, data=body, headers=HEADERS) as r:
                    await r.read()
                    status = r.status
            except asyncio.TimeoutError:
                kind = "timeout"
            except (aiohttp.ClientError, OSError) as e:
                kind = type(e).__name__
            done = time.perf_counter()
            if kind is not None or status in REJECT:
                # no hot loop against a dead port or a server shedding load
                await asyncio.sleep(0.01)
            if not (t0 <= done <= t1):
                continue
            completed_in_window += 1
            if status is not None and 200 <= status < 300:
                latencies.append(done - now)
            elif status in REJECT:
                rejections += 1
            else:
                errors[kind or f"HTTP {status}"] += 1

    connector = aiohttp.TCPConnector(limit=c, limit_per_host=c)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(c)]
        # Workers stop sending at t1; the last answers take at most --timeout seconds.
        _, pending = await asyncio.wait(
            tasks, timeout=args.warmup + args.duration + args.timeout + 5
        )
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    window = min(time.perf_counter(), t1) - t0
    peak = {}
    if sampler is not None:
        sampler.send_signal(signal.SIGTERM)
        out, _ = sampler.communicate(timeout=10)
        peak = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    latencies.sort()
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {
        "stack": args.stack,
        "concurrency": c,
        "window_s": round(window, 3),
        "ok": len(latencies),
        "rps": round(len(latencies) / window, 2) if window > 0 else None,
        "p50_ms": ms(percentile(latencies, 50)),
        "p95_ms": ms(percentile(latencies, 95)),
        "p99_ms": ms(percentile(latencies, 99)),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "rejections": rejections,
        "sent": counter,
        "hit_max_requests": counter >= args.max_requests,
        "peak_rss_mb": round(peak["peak_rss_bytes"] / 2**20, 1) if peak else None,
        "peak_pss_mb": round(peak["peak_pss_bytes"] / 2**20, 1) if peak else None,
        "peak_processes": peak.get("peak_processes"),
        "server_alive": alive(args.server_pid),
    }


async def main_async(args) -> int:
    images = pick_images(args.images, args.count)
    bodies = [multipart(p) for p in images]
    sanity = await wait_ready(args.url, bodies[0], args.ready_timeout, args.server_pid)
    sanity["image"] = str(images[0].relative_to(args.images))
    print(
        f"[{args.stack}] ready: {sanity['image']} -> {sanity['label']} ({sanity['confidence']})",
        flush=True,
    )
    failed = False
    for c in args.concurrency:
        row = await run_level(args, bodies, c)
        row["sanity"] = sanity
        row["images"] = len(bodies)
        row["warmup_s"] = args.warmup
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"[{args.stack}] c={c}: {row['rps']} req/s, p50 {row['p50_ms']} ms, "
            f"p99 {row['p99_ms']} ms, errors {row['errors']} {row['error_kinds'] or ''}, "
            f"rejections {row['rejections']}, peak RSS {row['peak_rss_mb']} MB",
            flush=True,
        )
        if not row["server_alive"]:
            print(f"[{args.stack}] server process died; skipping the remaining levels", flush=True)
            failed = True
            break
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack", required=True, help="row label")
    p.add_argument("--url", required=True, help="POST endpoint taking multipart field 'file'")
    p.add_argument("--server-pid", type=int, help="root of the server's process tree (RSS)")
    p.add_argument(
        "--concurrency", default="1,8,64,256", type=lambda s: [int(x) for x in s.split(",") if x]
    )
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds per level")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="cap per level")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument(
        "--images",
        type=Path,
        default=Path("../shared/cifar10/test"),
        help="class folders of JPEGs (relative to the repository root)",
    )
    p.add_argument("--count", type=int, default=256, help="distinct images to cycle")
    p.add_argument("--out", type=Path, default=Path("results.jsonl"), help="JSON lines, appended")
    args = p.parse_args()
    loopback_only(args.url)
    if not args.images.is_absolute():
        args.images = (REPO_ROOT / args.images).resolve()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run.sh stops us on Ctrl-C
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
