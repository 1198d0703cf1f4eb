"""HTTP load generator for a running SeedNet inference service (POST /predict).

    python bench/serve_bench.py [--url http://127.0.0.1:8000] [--kinds single multi]
                                [--concurrency 1 8 64] [--multi-images 32]
                                [--duration 10] [--warmup 2] [--requests N]
                                [--images ../shared/cifar10/test] [--metrics]
                                [--label "batching on"] [--json out.json] [--fail-on-error]
                                [--latencies] [--image-offset N]

Runs one scenario per (kind, concurrency) pair, closed loop: ``concurrency`` workers share
one ``httpx.AsyncClient`` and each sends its next request as soon as the previous one is
answered. ``single`` requests carry one JPEG in the multipart field ``file``; ``multi``
requests carry ``--multi-images`` JPEGs, each in a repeated field ``files``. The JPEGs are
real files read once from ``--images`` (recursive ``*.jpg``; relative paths are taken from
the repository root) and cycled.

Each scenario warms up for ``--warmup`` seconds, then measures for ``--duration`` seconds
(requests that complete inside the window count) or, with ``--requests N``, for exactly N
requests. Every scenario ends by itself: requests time out after ``--timeout`` seconds.

Columns: ``requests`` = measured requests, ``errors`` = those that failed (exception,
non-2xx status, or a 2xx whose ``predictions`` list does not have one entry per image),
``req/s`` and ``img/s`` = successful requests (images) per second, p50/p95/p99 = latency
of successful requests in ms (``time.perf_counter`` around the awaited request). With
``--metrics`` the service's ``/metrics`` is read before and after the measured window and
the mean server-side batch size (``seednet_batch_size`` histogram, delta sum / delta count)
is shown. ``--latencies`` adds every successful request's latency to the JSON rows, so
that several load generators run side by side (bench/gpu_serving.py) merge into exact
percentiles; ``--image-offset`` lets each of them start at another JPEG.

Only loopback targets (127.0.0.0/8, ::1, localhost) are accepted unless ``--allow-remote``
is given: this is a tool for benchmarking one's own service.

Example::

    python bench/serve_bench.py --duration 5 --metrics --label "batching on" --json on.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = Path("../shared/cifar10/test")
BATCH_METRIC = "seednet_batch_size"
MAX_ERROR_KINDS = 5


# ----------------------------------------------------------------------------- helpers


def is_loopback_host(host: str | None) -> bool:
    """True for a 127.0.0.0/8 or ::1 literal, or ``localhost`` if it resolves to loopback only.

    Other names are refused without a look-up (``localhost.`` or ``x.localhost`` may be
    sent to a DNS server, whose answer is not ours to trust).
    """
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return False
        return bool(infos) and all(_is_loopback_ip(str(info[4][0])) for info in infos)
    return _is_loopback_ip(host)


def _is_loopback_ip(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def load_images(folder: Path, limit: int) -> list[tuple[str, bytes]]:
    """(file name, JPEG bytes) for up to ``limit`` ``*.jpg`` files under ``folder``, sorted."""
    paths = sorted(folder.rglob("*.jpg"))
    if limit > 0:
        # Spread the picks over the whole (class-sorted) list rather than taking the head.
        step = max(1, len(paths) // limit)
        paths = paths[::step][:limit]
    return [(p.name, p.read_bytes()) for p in paths]


def parse_histogram(text: str, metric: str) -> tuple[float, float] | None:
    """(sum, count) of a Prometheus histogram, summed over all label sets; None if absent.

    Hand-parses the text exposition format: ``<metric>_sum{labels} value [timestamp]``.
    """
    totals = {"_sum": 0.0, "_count": 0.0}
    seen = {"_sum": False, "_count": False}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        for suffix in totals:
            name = metric + suffix
            if not line.startswith(name):
                continue
            rest = line[len(name) :]
            if rest.startswith("{"):
                end = rest.rfind("}")
                if end < 0:
                    break
                rest = rest[end + 1 :]
            elif rest and not rest[0].isspace():
                break  # a longer metric name that merely starts with ours
            parts = rest.split()
            if not parts:
                break
            try:
                totals[suffix] += float(parts[0])
            except ValueError:
                break
            seen[suffix] = True
            break
    if not (seen["_sum"] and seen["_count"]):
        return None
    return totals["_sum"], totals["_count"]


def _describe_model(info: Any) -> str | None:
    """``name v<version> backend=... device=...`` from a model description, if it has a name."""
    if not isinstance(info, dict):
        return None
    name = info.get("name") or info.get("model") or info.get("model_name")
    if not isinstance(name, str):
        return None
    parts = [name]
    version = info.get("version")
    if version is not None:
        parts.append(f"v{version}")
    for key in ("backend", "device"):
        value = info.get(key)
        if value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def describe_serving_model(body: Any) -> str | None:
    """Best effort: find the serving model in a ``GET /models`` body of unknown shape."""
    if isinstance(body, dict):
        for key in ("serving", "current", "active", "loaded", "model"):
            found = _describe_model(body.get(key))
            if found:
                return found
        found = _describe_model(body)
        if found:
            return found
        for key in ("models", "items", "versions"):
            if isinstance(body.get(key), list):
                return describe_serving_model(body[key])
        return None
    if isinstance(body, list):
        dicts = [m for m in body if isinstance(m, dict)]
        for flag in ("serving", "active", "current", "loaded", "default"):
            for m in dicts:
                if m.get(flag) is True:
                    return _describe_model(m)
        if len(dicts) == 1:
            return _describe_model(dicts[0])
    return None


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    label: str | None
    kind: str
    images_per_request: int
    concurrency: int
    requests: int
    errors: int
    seconds: float
    req_per_s: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_size: float | None = None
    error_kinds: dict[str, int] = field(default_factory=dict)
    #: every successful request's latency, sorted (only with ``--latencies``: lets a caller
    #: merge several load generators' results into exact percentiles)
    latencies_ms: list[float] | None = None


@dataclass
class _Record:
    start: float
    end: float
    error: str | None  # None: success
    ticketed: bool


@dataclass
class _State:
    measuring: bool = False
    stop: bool = False
    tickets: int | None = None  # requests left to send in --requests mode


class Bench:
    def __init__(
        self,
        client: httpx.AsyncClient,
        images: list[tuple[str, bytes]],
        endpoint: str,
        multi_endpoint: str,
        keep_latencies: bool = False,
    ) -> None:
        self.client = client
        self.images = images
        self.endpoint = endpoint
        self.multi_endpoint = multi_endpoint
        self.keep_latencies = keep_latencies
        self._next_image = 0

    def _take(self, n: int) -> list[tuple[str, bytes]]:
        out = []
        for _ in range(n):
            out.append(self.images[self._next_image])
            self._next_image = (self._next_image + 1) % len(self.images)
        return out

    async def request(self, kind: str, n: int) -> tuple[bool, str | None, Any]:
        """Send one request; (ok, error kind or None, parsed body or None)."""
        picked = self._take(n)
        if kind == "single":
            files: Any = {"file": (picked[0][0], picked[0][1], "image/jpeg")}
            url = self.endpoint
        else:
            files = [("files", (name, data, "image/jpeg")) for name, data in picked]
            url = self.multi_endpoint
        try:
            response = await self.client.post(url, files=files)
        except Exception as exc:  # any failure is a counted error, never a crashed worker
            return False, type(exc).__name__, None
        if not response.is_success:
            return False, f"HTTP {response.status_code}", None
        try:
            body = response.json()
            got = len(body["predictions"])
        except (ValueError, KeyError, TypeError):
            return False, "bad JSON", None
        if got != n:
            return False, f"{got} predictions != {n} images", None
        return True, None, body

    async def _worker(self, kind: str, n: int, state: _State, records: list[_Record]) -> None:
        while not state.stop:
            ticketed = False
            if state.measuring and state.tickets is not None:
                if state.tickets <= 0:
                    return
                state.tickets -= 1
                ticketed = True
            t0 = time.perf_counter()
            ok, error, _ = await self.request(kind, n)
            t1 = time.perf_counter()
            records.append(_Record(t0, t1, None if ok else error or "error", ticketed))

    async def metrics(self) -> tuple[float, float] | None:
        try:
            response = await self.client.get("/metrics")
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        return parse_histogram(response.text, BATCH_METRIC)

    async def scenario(
        self,
        kind: str,
        n: int,
        concurrency: int,
        duration: float,
        warmup: float,
        requests: int | None,
        with_metrics: bool,
        label: str | None,
    ) -> Row:
        state = _State()
        records: list[_Record] = []
        workers = [
            asyncio.create_task(self._worker(kind, n, state, records)) for _ in range(concurrency)
        ]
        try:
            if warmup > 0:
                await asyncio.sleep(warmup)
            before = await self.metrics() if with_metrics else None
            measure_start = time.perf_counter()
            if requests is not None:
                state.tickets = requests
                state.measuring = True
                await asyncio.gather(*workers)
                selected = [r for r in records if r.ticketed]
                measure_end = max((r.end for r in selected), default=measure_start)
            else:
                state.measuring = True
                await asyncio.sleep(duration)
                measure_end = time.perf_counter()
                state.stop = True
                await asyncio.gather(*workers)  # in-flight requests end (or time out)
                selected = [r for r in records if measure_start <= r.end <= measure_end]
        finally:
            state.stop = True
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        after = await self.metrics() if with_metrics else None

        seconds = max(measure_end - measure_start, 1e-9)
        latencies = sorted((r.end - r.start) * 1e3 for r in selected if r.error is None)
        errors = Counter(r.error for r in selected if r.error is not None)
        mean_batch = None
        if before is not None and after is not None and after[1] > before[1]:
            mean_batch = (after[0] - before[0]) / (after[1] - before[1])
        return Row(
            label=label,
            kind=kind,
            images_per_request=n,
            concurrency=concurrency,
            requests=len(selected),
            errors=sum(errors.values()),
            seconds=seconds,
            req_per_s=len(latencies) / seconds,
            images_per_s=len(latencies) * n / seconds,
            p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95),
            p99_ms=percentile(latencies, 99),
            mean_batch_size=mean_batch,
            error_kinds=dict(errors.most_common(MAX_ERROR_KINDS)),
            latencies_ms=latencies if self.keep_latencies else None,
        )


# ----------------------------------------------------------------------------- output


def _columns(with_label: bool, with_metrics: bool) -> list[tuple[str, int]]:
    cols = [("label", 14)] if with_label else []
    cols += [
        ("kind", 6),
        ("img/req", 7),
        ("conc", 5),
        ("requests", 8),
        ("errors", 6),
        ("req/s", 9),
        ("img/s", 10),
        ("p50 ms", 8),
        ("p95 ms", 8),
        ("p99 ms", 8),
    ]
    if with_metrics:
        cols.append(("mean batch", 10))
    return cols


def format_header(with_label: bool, with_metrics: bool) -> str:
    cells = []
    for i, (name, width) in enumerate(_columns(with_label, with_metrics)):
        left = i == 0 or name == "kind"
        cells.append(f"{name:<{width}}" if left else f"{name:>{width}}")
    return " ".join(cells)


def format_row(row: Row, with_label: bool, with_metrics: bool) -> str:
    def ms(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.1f}"

    values: list[str] = []
    if with_label:
        values.append(row.label or "")
    values += [
        row.kind,
        str(row.images_per_request),
        str(row.concurrency),
        str(row.requests),
        str(row.errors),
        f"{row.req_per_s:.1f}",
        f"{row.images_per_s:.1f}",
        ms(row.p50_ms),
        ms(row.p95_ms),
        ms(row.p99_ms),
    ]
    if with_metrics:
        values.append("n/a" if row.mean_batch_size is None else f"{row.mean_batch_size:.2f}")
    cells = []
    for i, ((name, width), value) in enumerate(
        zip(_columns(with_label, with_metrics), values, strict=True)
    ):
        left = i == 0 or name == "kind"
        cells.append(f"{value:<{width}}" if left else f"{value:>{width}}")
    return " ".join(cells)


def _json_safe(row: Row) -> dict[str, Any]:
    out = asdict(row)
    for key, value in out.items():
        if isinstance(value, float) and math.isnan(value):
            out[key] = None
    return out


# ----------------------------------------------------------------------------- main


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host")
    p.add_argument("--endpoint", default="/predict", help="path for requests (default /predict)")
    p.add_argument("--multi-endpoint", help="path for multi-image requests (default: --endpoint)")
    p.add_argument("--kinds", nargs="+", choices=["single", "multi"], default=["single", "multi"])
    p.add_argument("--concurrency", nargs="+", type=_positive_int, default=[1, 8, 64])
    p.add_argument(
        "--multi-images", type=_positive_int, default=32, help="images per multi request"
    )
    p.add_argument("--duration", type=_positive_float, default=10.0, help="seconds measured")
    p.add_argument("--warmup", type=_non_negative_float, default=2.0, help="seconds of warm-up")
    p.add_argument("--requests", type=_positive_int, help="measure N requests instead of time")
    p.add_argument("--timeout", type=_positive_float, default=30.0, help="per-request timeout, s")
    p.add_argument(
        "--images",
        type=Path,
        default=DEFAULT_IMAGES,
        help="folder of *.jpg (recursive; relative to the repo root)",
    )
    p.add_argument("--max-images", type=int, default=2048, help="images kept in memory (0: all)")
    p.add_argument("--metrics", action="store_true", help="report mean batch size from /metrics")
    p.add_argument("--label", help="value of a label column (e.g. 'batching on')")
    p.add_argument("--json", type=Path, help="write the rows (and the header) as JSON")
    p.add_argument(
        "--latencies", action="store_true", help="with --json: every request's latency too"
    )
    p.add_argument(
        "--image-offset", type=int, default=0, help="start cycling the JPEGs at this index"
    )
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    return p


async def _run(
    args: argparse.Namespace, images: list[tuple[str, bytes]]
) -> tuple[dict[str, Any], list[Row]]:
    pool = max(args.concurrency) + 1  # one spare for the /metrics reads during a scenario
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    timeout = httpx.Timeout(args.timeout, pool=None)  # queueing for a connection is not a fault
    with_label = args.label is not None
    rows: list[Row] = []
    async with httpx.AsyncClient(
        base_url=args.url, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        bench = Bench(
            client, images, args.endpoint, args.multi_endpoint or args.endpoint, args.latencies
        )
        bench._next_image = args.image_offset % len(images)
        model: str | None = None
        try:
            response = await client.get("/models", timeout=5.0)
            response.raise_for_status()
            model = describe_serving_model(response.json())
        except httpx.ConnectError as exc:
            print(f"error: cannot connect to {args.url}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except (httpx.HTTPError, ValueError):
            pass
        if model is None:  # fall back on what /predict says about the model that answered
            ok, error, body = await bench.request("single", 1)
            if ok and isinstance(body, dict):
                model = _describe_model(body.get("model"))
            elif not ok:
                print(f"# warning: probe request failed: {error}", file=sys.stderr)
        header: dict[str, Any] = {
            "url": args.url,
            "model": model,
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "cpu_count": os.cpu_count(),
            "images": len(images),
        }
        print(f"# serve_bench {args.url}")
        print(f"# model: {model or 'unknown'}")
        print(
            f"# {header['date_utc']} UTC, client host {os.cpu_count()} CPUs, "
            f"{len(images)} distinct JPEGs, "
            + (
                f"{args.requests} requests"
                if args.requests is not None
                else f"{args.duration:g} s measured"
            )
            + f" after {args.warmup:g} s warm-up"
        )
        print(format_header(with_label, args.metrics), flush=True)
        for kind in args.kinds:
            n = 1 if kind == "single" else args.multi_images
            for conc in args.concurrency:
                row = await bench.scenario(
                    kind,
                    n,
                    conc,
                    args.duration,
                    args.warmup,
                    args.requests,
                    args.metrics,
                    args.label,
                )
                rows.append(row)
                print(format_row(row, with_label, args.metrics), flush=True)
    for r in rows:
        if r.errors:
            kinds = ", ".join(f"{k} x{v}" for k, v in r.error_kinds.items())
            print(f"# errors {r.kind} c={r.concurrency}: {kinds}")
    return header, rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        print(f"error: not an http(s) URL: {args.url}", file=sys.stderr)
        return 2
    if not args.allow_remote and not is_loopback_host(parts.hostname):
        print(
            f"error: {parts.hostname} is not a loopback host; pass --allow-remote to "
            "benchmark a service you run elsewhere",
            file=sys.stderr,
        )
        return 2
    folder = args.images if args.images.is_absolute() else REPO_ROOT / args.images
    images = load_images(folder, args.max_images) if folder.is_dir() else []
    if not images:
        print(f"error: no *.jpg under {folder}", file=sys.stderr)
        return 2
    try:
        header, rows = asyncio.run(_run(args, images))
    except KeyboardInterrupt:
        return 130
    if args.json:
        doc = {**header, "label": args.label, "rows": [_json_safe(r) for r in rows]}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.fail_on_error and any(r.errors > 0 for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
