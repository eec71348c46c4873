"""Metrics: JSON lines per phase, progress lines with img/s and ETA, device-time accounting.

Only the main rank of a group writes. Every record carries the phase, wall time and the phase's
cumulative device-seconds (wall time x ranks), so cost sits on the same axis as accuracy.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricsLog:
    """Append-only JSON-lines log of one phase (``metrics.jsonl``) plus terminal progress."""

    def __init__(self, path: str | Path, phase: str, enabled: bool, stream=sys.stdout):
        self.path, self.phase, self.enabled, self.stream = Path(path), phase, enabled, stream
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"phase": self.phase, "kind": kind, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[{self.phase}] {msg}", file=self.stream, flush=True)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill; the rest is still good
                continue
    return out


class Throughput:
    """img/s over the last logging window and ETA from the phase's average step time."""

    def __init__(self, total_steps: int, done_steps: int):
        self.total, self.start_done = total_steps, done_steps
        self.t0 = self.t_last = time.perf_counter()
        self.imgs = 0

    def add(self, images: int) -> None:
        self.imgs += images

    def window(self, done_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        rate = self.imgs / max(now - self.t_last, 1e-9)
        self.imgs, self.t_last = 0, now
        per_step = (now - self.t0) / max(done_steps - self.start_done, 1)
        return rate, per_step * (self.total - done_steps)
