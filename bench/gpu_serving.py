"""The measurements of the GPU serving job (scripts/gpu_serving_job.sh runs this): the
model-only ceiling, the HTTP matrix through /predict, perf_analyzer over /v2 and gRPC, and
promote/reload under load, as ONE table.

    python bench/gpu_serving.py --device cuda --out OUT [--matrix full|quick]
        [--duration 5] [--warmup 1] [--server-cores 4-15] [--client-cores 0-3]
        [--images DIR] [--deadline EPOCH_S] [--workers-many 4] [--swap-seconds 60]

Every server is ``python -m service`` (the production path: uvicorn, the batcher, the
configured backend) on ``models/seednet@production``, pinned with ``taskset`` to the
server cores; the load generators (bench/serve_bench.py, perf_analyzer) are pinned to the
client cores. A scenario with more than 8 connections runs one serve_bench process per
client core (Python's event loop would otherwise limit the client, not the server) and
merges their latencies exactly (``--latencies``).

Per row: client-side req/s, images/s, p50/p99 and errors; server-side p50/p99 of
``seednet_request_duration_seconds{route="/predict"}`` and the mean of each
``seednet_stage_seconds`` stage, from /metrics deltas around the measured window
(read_body, decode, serialise and queue_wait per request; model per forward pass);
the mean batch; GPU utilisation (nvidia-smi) and server CPU (cores busy, /proc).

``SEEDNET_MAX_QUEUE_IMAGES`` is raised to 4096 so that admission control (429) does not
refuse the closed-loop load (32 clients x 64 images = 2048 images in flight).
Steps run in priority order and each is skipped, with a row saying so, when it would
end after ``--deadline``, so the job ends within its time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hostinfo import free_port  # (bench/ is on the path when run as a script)

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STAGES = ("read_body", "decode", "queue_wait", "model", "serialise")
ADMIN_TOKEN = "gpu-serving-job"


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Config:
    name: str
    backend: str
    graphs: bool
    workers: int
    grpc: bool = False  # also serve gRPC (for perf_analyzer)


@dataclass(frozen=True)
class Scenario:
    kind: str  # single | multi
    images: int
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.images} img x c={self.concurrency}"


def matrix(kind: str, device: str, workers_many: int) -> tuple[list[Config], list[Scenario]]:
    if kind == "quick":  # the CPU rehearsal: every code path, few and short rows
        configs = [
            Config("ts-w1", "torchscript", True, 1, grpc=True),
            Config(f"ts-w{workers_many}", "torchscript", True, workers_many),
            Config("eager-w1", "eager", True, 1),
            Config("onnx-w1", "onnx", True, 1),
        ]
        scenarios = [Scenario("single", 1, 1), Scenario("single", 1, 16), Scenario("multi", 64, 2)]
        return configs, scenarios
    configs = [
        Config("ts-graphs-w1", "torchscript", True, 1, grpc=True),
        Config(f"ts-graphs-w{workers_many}", "torchscript", True, workers_many),
        Config("eager-graphs-w1", "eager", True, 1),
        Config("onnx-w1", "onnx", True, 1),
        Config("ts-nographs-w1", "torchscript", False, 1),
    ]
    scenarios = [
        Scenario("single", 1, 1),
        Scenario("single", 1, 64),
        Scenario("single", 1, 256),
        Scenario("multi", 64, 8),
        Scenario("multi", 64, 32),
    ]
    return configs, scenarios


# ------------------------------------------------------------------ results


@dataclass
class Row:
    kind: str  # model | http | perf_analyzer | swap | skipped | error
    config: str = ""
    load: str = ""
    req_s: float | None = None
    img_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int | None = None
    srv_p50_ms: float | None = None
    srv_p99_ms: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    batch: float | None = None
    gpu_util: float | None = None
    srv_cpu: float | None = None
    note: str = ""


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = (
        "| kind | config | load | req/s | images/s | p50 ms | p99 ms | errors | srv p50 | "
        "srv p99 | body / decode / queue / model / serialise ms | batch | GPU % | srv CPU | note |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        stages = " / ".join(fmt(r.stages_ms.get(s), 2) for s in STAGES) if r.stages_ms else ""
        cells = [
            r.kind, r.config, r.load, fmt(r.req_s), fmt(r.img_s), fmt(r.p50_ms, 2),
            fmt(r.p99_ms, 2), "" if r.errors is None else str(r.errors), fmt(r.srv_p50_ms, 2),
            fmt(r.srv_p99_ms, 2), stages, fmt(r.batch), fmt(r.gpu_util, 0), fmt(r.srv_cpu),
            r.note,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ /metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        try:
            out.append((m.group(1), labels, float(m.group(4))))
        except ValueError:
            continue
    return out


def histogram(samples, name: str, **match: str) -> tuple[dict[float, float], float, float]:
    """(cumulative count per upper bound, sum, count) of a histogram, summed over the label
    sets that carry ``match``."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for metric, labels, value in samples:
        if any(labels.get(k) != v for k, v in match.items()):
            continue
        if metric == name + "_bucket":
            le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + value
        elif metric == name + "_sum":
            total += value
        elif metric == name + "_count":
            count += value
    return buckets, total, count


def delta(after, before):
    b_after, s_after, c_after = after
    b_before, s_before, c_before = before
    return (
        {le: v - b_before.get(le, 0.0) for le, v in b_after.items()},
        s_after - s_before,
        c_after - c_before,
    )


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket that holds the rank."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= rank:
            if math.isinf(le):
                return lower
            inside = buckets[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, buckets[le]
    return lower


# ------------------------------------------------------------------ processes


def cores(spec: str | None) -> list[int]:
    if not spec:
        return []
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def pinned(argv: list[str], spec: str | None) -> list[str]:
    if spec and shutil.which("taskset"):
        return ["taskset", "-c", spec, *argv]
    return argv


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of ``pid`` and its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / tick
        todo += children.get(p, [])
    return total


class GpuSampler:
    """Mean GPU utilisation while it runs (nvidia-smi every 200 ms); None without one."""

    def __init__(self, enabled: bool) -> None:
        self.proc = None
        if enabled and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        return sum(values) / len(values) if values else None


class Server:
    def __init__(self, cfg: Config, args, log_dir: Path, registry: Path, extra: dict) -> None:
        self.cfg = cfg
        self.port = free_port()
        self.grpc_port = free_port() if cfg.grpc else None
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDNET_")}
        env |= {
            "SEEDNET_REGISTRY_ROOT": str(registry),
            "SEEDNET_MODEL_NAME": "seednet",
            "SEEDNET_MODEL_REF": "production",
            "SEEDNET_BACKEND": cfg.backend,
            "SEEDNET_DEVICE": args.device,
            "SEEDNET_WORKERS": str(cfg.workers),
            "SEEDNET_CUDA_GRAPHS": "true" if cfg.graphs else "false",
            "SEEDNET_HOST": "127.0.0.1",
            "SEEDNET_PORT": str(self.port),
            "SEEDNET_ACCESS_LOG": "false",
            "SEEDNET_LOG_LEVEL": "warning",
            "SEEDNET_MAX_QUEUE_IMAGES": "4096",
            "PYTHONUNBUFFERED": "1",
        } | extra
        if self.grpc_port:
            env["SEEDNET_GRPC_PORT"] = str(self.grpc_port)
        self.log = log_dir / f"server-{cfg.name}.log"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            pinned([PY, "-m", "service"], args.server_cores),
            cwd=REPO, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 420) -> float:
        import httpx

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-600:].strip().replace("\n", " / ")
                raise RuntimeError(f"server exited ({self.proc.returncode}): {tail}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    live = self.workers_serving()
                    if live >= self.cfg.workers:
                        return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def workers_serving(self) -> int:
        """Workers that have a model (one seednet_model_info series each)."""
        samples = parse_metrics(self.metrics())
        return sum(1 for m, _, v in samples if m == "seednet_model_info" and v == 1)

    def metrics(self) -> str:
        import httpx

        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ------------------------------------------------------------------ steps


class Job:
    def __init__(self, args) -> None:
        self.args = args
        self.rows: list[Row] = []
        self.work = Path(args.work)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def left(self) -> float:
        return (self.args.deadline or math.inf) - time.time()

    def fits(self, what: str, estimate: float) -> bool:
        if self.left() >= estimate:
            return True
        left = max(0.0, self.left())
        self.rows.append(Row("skipped", what, note=f"~{estimate:.0f} s needed, {left:.0f} s left"))
        print(f"# skip {what}: ~{estimate:.0f} s needed, {self.left():.0f} s left", flush=True)
        return False

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)

    # -------------------------------------------------------------- model-only
    def model_only(self) -> None:
        a = self.args
        out = self.work / "infer_bench.json"
        batches = ["1", "64", "256", "1024"] if a.device == "cuda" else ["1", "64"]
        argv = [PY, "bench/infer_bench.py", "--weights", "models/seednet/1", "--device",
                a.device, "--batch-sizes", *batches, "--iters", "30" if a.device == "cuda" else "3",
                "--json", str(out)]  # fmt: skip
        r = subprocess.run(pinned(argv, a.server_cores), cwd=REPO, capture_output=True, text=True)
        (self.logs / "infer_bench.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0 or not out.exists():
            self.add(Row("error", "model-only", note=(r.stderr.strip().splitlines() or ["?"])[-1]))
            return
        doc = json.loads(out.read_text())
        for x in doc["rows"]:
            graph = ", CUDA graph" if x["cuda_graph"] else ""
            self.add(
                Row(
                    "model", f"{x['backend']} {x['precision']}{graph}", f"batch {x['batch']}",
                    img_s=x["images_per_second"], p50_ms=x["ms_per_batch"],
                    note="no HTTP; p50 = ms per batch (mean)",
                )
            )  # fmt: skip

    # -------------------------------------------------------------- HTTP matrix
    def client(self, url: str, sc: Scenario, on_measure=None) -> tuple[Row, list[str]]:
        """Run the load generators; ``on_measure()`` is called when their warm-up ends."""
        a = self.args
        n_proc = 1 if sc.concurrency <= 8 else max(1, min(len(cores(a.client_cores)) or 1,
                                                           sc.concurrency))  # fmt: skip
        per = [sc.concurrency // n_proc + (i < sc.concurrency % n_proc) for i in range(n_proc)]
        procs = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, c in enumerate(per):
                argv = [PY, "bench/serve_bench.py", "--url", url, "--kinds", sc.kind,
                        "--concurrency", str(c), "--multi-images", str(sc.images),
                        "--duration", str(a.duration), "--warmup", str(a.warmup),
                        "--timeout", "120", "--images", str(a.images), "--max-images", "0",
                        "--image-offset", str(i * 97), "--latencies",
                        "--json", f"{tmp}/{i}.json"]  # fmt: skip
                procs.append(
                    subprocess.Popen(
                        pinned(argv, a.client_cores),
                        cwd=REPO,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                    )  # fmt: skip
                )
            time.sleep(a.warmup)
            if on_measure is not None:
                on_measure()
            outputs = [p.communicate()[0] for p in procs]
            docs = [json.loads(Path(f"{tmp}/{i}.json").read_text())
                    for i in range(n_proc) if Path(f"{tmp}/{i}.json").exists()]  # fmt: skip
        if len(docs) != n_proc:
            return Row("error", load=sc.label, note="load generator failed"), outputs
        rows = [d["rows"][0] for d in docs]
        lat = sorted(x for r in rows for x in (r["latencies_ms"] or []))
        seconds = max(r["seconds"] for r in rows)
        ok = len(lat)
        kinds: dict[str, int] = {}
        for r in rows:
            for k, v in r["error_kinds"].items():
                kinds[k] = kinds.get(k, 0) + v
        row = Row(
            "http", load=sc.label + (f" ({n_proc} clients)" if n_proc > 1 else ""),
            req_s=ok / seconds, img_s=ok * sc.images / seconds,
            p50_ms=pct(lat, 50), p99_ms=pct(lat, 99), errors=sum(r["errors"] for r in rows),
            note=", ".join(f"{k} x{v}" for k, v in kinds.items()),
        )  # fmt: skip
        return row, outputs

    def http_config(self, cfg: Config, scenarios: list[Scenario]) -> Server | None:
        a = self.args
        tag = label(cfg, a.device)
        srv = Server(cfg, a, self.logs, REPO / "models", {})
        try:
            start_s = srv.wait_ready()
        except RuntimeError as exc:
            srv.stop()
            self.add(Row("error", tag, note=str(exc)[:300]))
            return None
        info = json.loads(
            __import__("httpx").get(srv.url + "/models", timeout=10).text
        )["serving"]  # fmt: skip
        print(f"# {cfg.name}: ready in {start_s:.1f} s, serving {info}", flush=True)
        if info.get("device") != a.device:
            self.rows.append(
                Row("note", tag, note=f"serves on {info.get('device')}, not {a.device}")
            )
        for sc in scenarios:
            if not self.fits(f"{tag} {sc.label}", a.duration + a.warmup + 5):
                continue
            start: dict = {}

            def measuring(start=start) -> None:  # the clients' warm-up is over
                start["metrics"] = parse_metrics(srv.metrics())
                start["cpu"], start["t"] = tree_cpu_seconds(srv.proc.pid), time.perf_counter()
                start["gpu"] = GpuSampler(a.device == "cuda")

            row, outputs = self.client(srv.url, sc, measuring)
            util = start["gpu"].stop()
            cpu = (tree_cpu_seconds(srv.proc.pid) - start["cpu"]) / (
                time.perf_counter() - start["t"]
            )
            before = start["metrics"]
            after = parse_metrics(srv.metrics())
            (
                self.logs / f"client-{cfg.name}-{sc.kind}{sc.images}-c{sc.concurrency}.log"
            ).write_text("\n".join(outputs))
            row.config, row.gpu_util, row.srv_cpu = tag, util, cpu
            self.server_side(row, before, after)
            if row.note == "" and start_s and sc is scenarios[0]:
                row.note = f"started in {start_s:.0f} s"
            self.add(row)
        return srv

    def server_side(self, row: Row, before, after) -> None:
        """Server-side figures from /metrics deltas over the measured window (after warm-up)."""
        req = delta(
            histogram(after, "seednet_request_duration_seconds", route="/predict"),
            histogram(before, "seednet_request_duration_seconds", route="/predict"),
        )
        p50, p99 = quantile(0.5, req[0]), quantile(0.99, req[0])
        row.srv_p50_ms = None if p50 is None else p50 * 1e3
        row.srv_p99_ms = None if p99 is None else p99 * 1e3
        for stage in STAGES:
            _, s, c = delta(
                histogram(after, "seednet_stage_seconds", stage=stage),
                histogram(before, "seednet_stage_seconds", stage=stage),
            )
            if c > 0:
                row.stages_ms[stage] = s / c * 1e3
        _, s, c = delta(
            histogram(after, "seednet_batch_size"), histogram(before, "seednet_batch_size")
        )
        row.batch = s / c if c > 0 else None

    # -------------------------------------------------------------- perf_analyzer
    def perf(self, srv: Server, tag: str) -> None:
        a = self.args
        runs = [
            (["--protocols", "http", "grpc", "--concurrency", "1", "64"], 1),
            (["--protocols", "grpc", "--concurrency", "8", "--batch", "64"], 64),
        ]
        if a.matrix == "quick":
            runs = [(["--protocols", "http", "grpc", "--concurrency", "1"], 1)]
        for extra, batch in runs:
            out = self.work / "oip.json"
            out.unlink(missing_ok=True)
            argv = [PY, "bench/oip_bench.py", "--http", f"127.0.0.1:{srv.port}",
                    "--grpc", f"127.0.0.1:{srv.grpc_port}", "--images", str(a.images),
                    "--measurement-ms", "2000", "--stability", "50", "--timeout", "90",
                    "--json", str(out), *extra]  # fmt: skip
            r = subprocess.run(pinned(argv, a.client_cores), cwd=REPO, capture_output=True,
                               text=True)  # fmt: skip
            with (self.logs / "oip_bench.log").open("a") as f:
                f.write(r.stdout + r.stderr)
            if not out.exists():
                last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
                self.add(Row("perf_analyzer", tag, " ".join(extra), note=last[:200]))
                return
            for x in json.loads(out.read_text())["rows"]:
                rps = None if x["infer_per_s"] is None else x["infer_per_s"] / batch
                self.add(
                    Row(
                        "perf_analyzer", tag,
                        f"v2 {x['protocol']} {x['input']} b={x['batch']} c={x['concurrency']}",
                        req_s=rps, img_s=x["infer_per_s"], p50_ms=x["p50_ms"],
                        p99_ms=x["p99_ms"], note=x["error"] or "pixels, no decode",
                    )
                )  # fmt: skip

    # -------------------------------------------------------------- swaps under load
    def swap(self) -> None:
        a = self.args
        reg = self.work / "swap-registry"
        r = subprocess.run([PY, __file__, "--make-swap-registry", str(reg)], cwd=REPO,
                           capture_output=True, text=True)  # fmt: skip
        (self.logs / "swap-registry.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            self.add(Row("error", "swap", note=(r.stderr.strip().splitlines() or ["?"])[-1]))
            return
        cfg = Config("swap", "torchscript", True, 1)
        tag = label(cfg, a.device)
        srv = Server(cfg, a, self.logs, reg, {"SEEDNET_ADMIN_TOKEN": ADMIN_TOKEN})
        try:
            srv.wait_ready()
            result = asyncio.run(swap_under_load(srv.url, a))
        except Exception as exc:  # a broken check is a row, never a lost table
            self.add(Row("error", "swap", note=f"{type(exc).__name__}: {exc}"[:300]))
            return
        finally:
            srv.stop()
        self.add(Row("swap", tag, result.pop("load"), **result))

    # -------------------------------------------------------------- all
    def run(self) -> None:
        a = self.args
        configs, scenarios = matrix(a.matrix, a.device, a.workers_many)
        per_config = len(scenarios) * (a.duration + a.warmup + 4) + 40
        if self.fits("model-only (bench/infer_bench.py)", 60 if a.device == "cuda" else 90):
            self.model_only()
        first, rest = configs[0], configs[1:]
        if self.fits(first.name, per_config):
            srv = self.http_config(first, scenarios)
            if srv is not None:
                tag = label(first, a.device)
                if self.fits("perf_analyzer", 50 if a.matrix == "full" else 40):
                    self.perf(srv, tag)
                srv.stop()
        if self.fits("swap under load", a.swap_seconds + 60):
            self.swap()
        for cfg in rest:
            if cfg.backend == "onnx" and not onnx_cuda() and a.device == "cuda":
                self.rows.append(
                    Row("skipped", f"onnx graphs=- w={cfg.workers}",
                        note="this onnxruntime has no CUDAExecutionProvider (install "
                        "onnxruntime-gpu); the backend would run on the CPU")
                )  # fmt: skip
                continue
            if self.fits(cfg.name, per_config + 10 * cfg.workers):
                srv = self.http_config(cfg, scenarios)
                if srv is not None:
                    srv.stop()


def label(cfg: Config, device: str) -> str:
    graphs = ("CUDA graphs" if cfg.graphs else "no graphs") if device == "cuda" else "cpu"
    if cfg.backend == "onnx":
        graphs = "ORT " + ("CUDA EP" if device == "cuda" else "CPU EP")
    return f"{cfg.backend}, {graphs}, {cfg.workers} worker{'s' if cfg.workers > 1 else ''}"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def onnx_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


# ------------------------------------------------------------------ swap check


def make_swap_registry(dest: Path) -> None:
    """seednet@1 (the production weights) and seednet@2 = seednet-small@1's weights: two
    versions whose answers differ, so that every response proves which one computed it."""
    from dataclasses import fields

    from registry import Registry
    from registry.manifest import VersionSpec
    from seednet.export import materialize

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(REPO / "models" / "seednet", dest / "seednet")  # with its built exports
    src = Registry(REPO / "models").resolve("seednet-small", "1")
    spec = VersionSpec(**{f.name: getattr(src.manifest, f.name) for f in fields(VersionSpec)})
    reg = Registry(dest)
    files = {n: src.path / n for n in ("weights.safetensors", "golden.safetensors")}
    mv = reg.publish("seednet", files, spec, parent="seednet-small@1")
    materialize(reg, mv)
    print(f"published {mv.ref} from seednet-small@1; production -> {reg.aliases('seednet')}")


async def swap_under_load(url: str, a) -> dict:
    """c clients send single JPEGs while the production alias flips 1 <-> 2 every
    ``a.swap_every`` s for ``a.swap_seconds`` s; every answer is checked against what the
    version it names answers for that image (recorded before the load, with no swap)."""
    import httpx
    import numpy as np

    files = sorted(Path(a.images).rglob("*.jpg"))[::20][:32]
    blobs = [p.read_bytes() for p in files]
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    limits = httpx.Limits(max_connections=a.swap_concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def predict(i: int):
            r = await client.post("/predict", files={"file": (f"{i}.jpg", blobs[i], "image/jpeg")})
            if r.status_code != 200:
                return r.status_code, None, None
            body = r.json()
            pred = body["predictions"][0]
            probs = [pred["probabilities"][c] for c in CLASSES]
            att = [w for block in pred["attention"] for w in block["weights"]]
            return 200, body["model"]["version"], np.array(probs + att)

        async def promote(version: str) -> tuple[int, float]:
            t = time.perf_counter()
            r = await client.post(
                "/models/seednet/promote",
                json={"version": version, "alias": "production"},
                headers=headers,
            )
            return r.status_code, time.perf_counter() - t

        expected: dict[str, list] = {}
        for version in ("2", "1"):
            status, _ = await promote(version)
            assert status == 200, f"promote {version}: {status}"
            expected[version] = [(await predict(i))[2] for i in range(len(blobs))]
        apart = [np.abs(x - y).max() for x, y in zip(expected["1"], expected["2"], strict=True)]
        tol = 0.02  # batch composition (padding, TF32 convolutions) moves a few 1e-4
        distinct = sum(d > 2 * tol for d in apart)

        answers: list[tuple[int, str | None, bool, float]] = []
        stop = False

        async def worker(k: int) -> None:
            i = k
            while not stop:
                t = time.perf_counter()
                try:
                    status, version, probs = await predict(i % len(blobs))
                except httpx.HTTPError:
                    status, version, probs = -1, None, None
                dt = time.perf_counter() - t
                good = (
                    status == 200
                    and version in expected
                    and np.abs(probs - expected[version][i % len(blobs)]).max() <= tol
                )
                answers.append((status, version, good, dt))
                i += 7

        tasks = [asyncio.create_task(worker(k)) for k in range(a.swap_concurrency)]
        promotes: list[tuple[int, float]] = []
        t_start = time.perf_counter()
        target = "2"
        while time.perf_counter() - t_start < a.swap_seconds:
            await asyncio.sleep(a.swap_every)
            promotes.append(await promote(target))
            target = "1" if target == "2" else "2"
        elapsed = time.perf_counter() - t_start
        stop = True
        await asyncio.gather(*tasks)
    failed = sum(1 for s, _, _, _ in answers if s != 200)
    mismatched = sum(1 for s, _, good, _ in answers if s == 200 and not good)
    lat = sorted(dt * 1e3 for s, _, _, dt in answers if s == 200)
    versions = {v for _, v, _, _ in answers if v}
    assert distinct, "no test image tells the two versions apart: the check would be blind"
    swaps_ok = sum(1 for s, _ in promotes if s == 200)
    slowest = max((t for _, t in promotes), default=0)
    return {
        "load": f"1 img x c={a.swap_concurrency}, promote every {a.swap_every:g} s "
        f"for {a.swap_seconds:g} s",
        "req_s": len(lat) / elapsed,
        "img_s": len(lat) / elapsed,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "errors": failed,
        "note": f"{swaps_ok}/{len(promotes)} promotes ok (slowest {slowest:.1f} s), "
        f"{mismatched} answers not from the version they name, versions seen "
        f"{sorted(versions)}, {distinct}/{len(blobs)} test images tell the versions apart "
        "(probabilities + attention)",
    }


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", type=Path, help="where table.md and results.json go")
    p.add_argument("--work", default="runs/gpu-serving", help="scratch folder (logs, registry)")
    p.add_argument("--matrix", choices=["full", "quick"], default="full")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per row")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per row")
    p.add_argument("--server-cores", help="taskset list for the server (e.g. 4-15)")
    p.add_argument("--client-cores", help="taskset list for the load generators (e.g. 0-3)")
    p.add_argument("--images", type=Path, default=Path("../shared/cifar10/test"))
    p.add_argument("--deadline", type=float, help="epoch seconds by which the job must end")
    p.add_argument("--workers-many", type=int, default=4, help="the multi-worker rows")
    p.add_argument("--swap-seconds", type=float, default=60.0)
    p.add_argument("--swap-every", type=float, default=5.0)
    p.add_argument("--swap-concurrency", type=int, default=32)
    p.add_argument("--header", default="", help="a line printed above the table (the card)")
    p.add_argument("--notes", default="", help="a line printed below the header (tests...)")
    p.add_argument("--make-swap-registry", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.make_swap_registry:
        make_swap_registry(a.make_swap_registry)
        return 0
    a.images = a.images if a.images.is_absolute() else (REPO / a.images).resolve()
    job = Job(a)
    try:
        job.run()
    finally:
        took = time.time() - job.t0
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (
            f"{a.header}\n{a.notes}\n{when}, device {a.device}, matrix {a.matrix}, "
            f"{a.duration:g} s "
            f"measured after {a.warmup:g} s warm-up per row, server cores {a.server_cores}, "
            f"client cores {a.client_cores}; measurements took {took:.0f} s. bf16: the "
            "service has no precision setting (fp32 only through HTTP); bf16 rows are "
            "model-only.\n\n" + table(job.rows) + "\n"
        )
        print("\n" + text, flush=True)
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "table.md").write_text(text)
            (a.out / "results.json").write_text(
                json.dumps({"header": a.header, "rows": [asdict(r) for r in job.rows]}, indent=1)
            )
    return 0 if not any(r.kind == "error" for r in job.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
