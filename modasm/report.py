"""The comparison table of a run: meta, each hybrid, assembled, E2E — accuracy and cost.

Read from the shard sets' manifests (metrics at export) and the phases' JSON lines; no W&B needed.
"""
from __future__ import annotations

from pathlib import Path

from .shards import read_manifest


def _row(name: str, manifest: dict | None, cumulative: float | None = None) -> dict:
    if manifest is None:
        return {"model": name, "top1": None, "top5": None, "device_hours": None, "cumulative": cumulative}
    m = manifest["metrics"]
    return {"model": name, "top1": m.get("top1"), "top5": m.get("top5"),
            "device_hours": m.get("device_hours"), "cumulative": cumulative}


def collect(run_dir: str | Path) -> list[dict]:
    """Rows in pipeline order; a phase not run yet shows as empty."""
    run_dir = Path(run_dir)
    meta = read_manifest(run_dir / "meta" / "export")
    K = len(meta["split"]) if meta else 0
    rows, spent = [], 0.0

    def add(name, manifest, count=True):
        nonlocal spent
        if manifest is not None and count:
            spent += manifest["metrics"].get("device_hours", 0.0)
        rows.append(_row(name, manifest, spent if manifest is not None and count else None))

    add("meta model", meta)
    for k in range(K):
        add(f"hybrid {k} (after incubation)", read_manifest(run_dir / "incubate" / f"module-{k:02d}" / "export"))
    add("assembled (after fine-tune)", read_manifest(run_dir / "assemble" / "export"))
    e2e = read_manifest(run_dir / "e2e" / "export")
    rows.append(_row("E2E baseline", e2e, e2e["metrics"].get("device_hours") if e2e else None))
    return rows


def table(rows: list[dict]) -> str:
    def f(v, spec):
        return "—" if v is None else format(v, spec)
    head = f"{'model':<30} {'top-1 %':>8} {'top-5 %':>8} {'device-h':>9} {'cumul. device-h':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<30} {f(r['top1'], '8.2f')} {f(r['top5'], '8.2f')} "
                     f"{f(r['device_hours'], '9.4f')} {f(r['cumulative'], '16.4f')}")
    lines.append("cumul. device-h: device time of the pipeline up to that row (meta + incubations + "
                 "fine-tune); E2E counts alone.")
    return "\n".join(lines)
