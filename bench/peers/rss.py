"""Resident memory of a process tree, read from /proc (Linux only).

    python rss.py sample PID [--interval 0.1]   # until SIGTERM/SIGINT, then one JSON line:
                                # {"peak_rss_bytes", "peak_pss_bytes", "peak_processes", "samples"}
    python rss.py tree PID                       # PID and all its descendants, one per line

The tree is the root plus every process whose parent chain reaches it (TorchServe: the
launcher, the Java frontend and its Python workers; LitServe: the API servers and inference
workers). A sample is the sum of VmRSS over the tree; pages shared between processes (torch's
libraries mapped by several workers, pages a forked worker shares with its parent) are
counted once per process, as ``ps`` would. Every 5th sample also sums PSS (Proportional Set
Size, /proc/PID/smaps_rollup: shared pages split between the processes that map them), which
is the fairer total for multi-process servers. The tree is re-read every 10th sample and
whenever a member disappears.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _ppids() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces and parentheses
        fields = stat[stat.rindex(b")") + 2 :].split()
        out[int(name)] = int(fields[1])
    return out


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    ppids = _ppids()
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    if root not in ppids:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    return None


def sample(root: int, interval: float) -> dict:
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    parent = os.getppid()
    peak, peak_pss, peak_procs, n, members = 0, 0, 0, 0, []
    while not stop and os.getppid() == parent:  # never outlive the load generator
        if n % 10 == 0 or not members:
            members = tree(root)
        values = [rss_bytes(p) for p in members]
        if any(v is None for v in values):
            members = tree(root)
            values = [rss_bytes(p) for p in members]
        total = sum(v for v in values if v)
        if total > peak:
            peak, peak_procs = total, sum(1 for v in values if v)
        if n % 5 == 0:
            peak_pss = max(peak_pss, sum(v or 0 for v in map(pss_bytes, members)))
        n += 1
        time.sleep(interval)
    return {
        "peak_rss_bytes": peak,
        "peak_pss_bytes": peak_pss,
        "peak_processes": peak_procs,
        "samples": n,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("pid", type=int)
    s.add_argument("--interval", type=float, default=0.1)
    t = sub.add_parser("tree")
    t.add_argument("pid", type=int)
    a = p.parse_args()
    if a.cmd == "tree":
        for pid in tree(a.pid):
            print(pid)
        return 0
    result = json.dumps(sample(a.pid, a.interval))
    with contextlib.suppress(BrokenPipeError):  # the load generator is gone: nobody to tell
        print(result, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
