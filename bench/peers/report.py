"""Turn a run's results.jsonl into one markdown table plus machine information.

    python report.py RUN_DIR [--title TEXT] [--note TEXT ...]

Reads RUN_DIR/results.jsonl (one JSON object per stack and concurrency level, written by
loadgen.py) and RUN_DIR/stacks.tsv (label, tab, what each stack was, written by run.sh), prints the
table and writes RUN_DIR/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The instruction sets that decide which backend and precision win on a CPU (int8 needs
# VNNI to be fast without saturating; AMX and bf16 change the fp32/bf16 picture).
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_flags() -> str:
    """The CPU's SIMD flags among :data:`SIMD_FLAGS` (lscpu's names), or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in SIMD_FLAGS if f in have) or "none of " + ", ".join(
                    SIMD_FLAGS
                )
    except OSError:
        pass
    return "unknown"


def mem_total_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def git_rev(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[dict], stacks: dict[str, str]) -> str:
    head = (
        "| stack | c | req/s | p50 ms | p95 ms | p99 ms | errors | rejections "
        "| peak RSS MB | peak PSS MB |"
    )
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['stack']} | {r['concurrency']} | {fmt(r['rps'])} | {fmt(r['p50_ms'])} | "
            f"{fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {r['errors']} | {r['rejections']} | "
            f"{fmt(r['peak_rss_mb'], 0)} | {fmt(r.get('peak_pss_mb'), 0)} |"
        )
    measured = {r["stack"] for r in rows}
    for name in stacks:
        if name not in measured:
            lines.append(f"| {name} | - | no result (failed or not ready; see logs/) |||||||")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--title", default="SeedNet vs peers")
    p.add_argument("--note", action="append", default=[])
    a = p.parse_args()
    results = a.run_dir / "results.jsonl"
    rows = (
        [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
        if results.exists()
        else []
    )
    stacks_file = a.run_dir / "stacks.tsv"
    stacks = (
        dict(line.split("\t", 1) for line in stacks_file.read_text().splitlines() if "\t" in line)
        if stacks_file.exists()
        else {}
    )
    repo = Path(__file__).resolve().parent.parent.parent

    tbl = table(rows, stacks) if rows or stacks else "(no results)"
    print(tbl)

    out = [f"# {a.title}", ""]
    out += [f"- {n}" for n in a.note]
    out += [
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; memory {mem_total_gib()}",
        f"- CPU flags: {cpu_flags()}",
        f"- kernel: {platform.release()}; Python {platform.python_version()}",
        f"- repository: {git_rev(repo)}",
        "",
        tbl,
        "",
    ]
    sanity = {r["stack"]: r.get("sanity") for r in rows}
    if sanity:
        out.append("Same weights, same answer (first image, before the load):")
        out.append("")
        for stack, s in sanity.items():
            if s:
                out.append(f"- {stack}: {s['image']} -> {s['label']} ({fmt(s['confidence'], 4)})")
        out.append("")
    errors = [r for r in rows if r.get("error_kinds")]
    if errors:
        out.append("Error kinds:")
        out.append("")
        for r in errors:
            out.append(f"- {r['stack']} c={r['concurrency']}: {r['error_kinds']}")
        out.append("")
    if stacks:
        out.append("Stacks:")
        out.append("")
        for name, info in stacks.items():
            out.append(f"- **{name}**: {info}")
        out.append("")
    out.append(
        "Columns: req/s = 2xx answers per second of the measured window; p50/p95/p99 = latency "
        "of 2xx answers; errors = non-2xx other than 429/503, timeouts and connection errors; "
        "rejections = 429/503; peak RSS = largest sum of VmRSS over the server's process tree "
        "(sampled every 100 ms during warm-up and window; shared pages counted once per process); "
        "peak PSS = the same with shared pages split between the processes mapping them "
        "(sampled every 500 ms)."
    )
    (a.run_dir / "results.md").write_text("\n".join(out) + "\n")
    print(f"\nwritten: {a.run_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
