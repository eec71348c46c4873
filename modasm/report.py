"""The report of a run: comparison table and plots, from the phases' JSON lines and manifests only.

``write_report(run_dir)`` writes ``<run_dir>/report/report.md`` with ``accuracy_vs_cost.png`` (top-1
against the pipeline's cumulative device-hours: assembled path vs E2E), ``incubation.png`` (each
module's incubation curve) and ``loss.png`` (training loss of every phase). No W&B needed.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .metrics import read_jsonl
from .shards import read_manifest


def _phase_dirs(run_dir: Path) -> dict[str, Path]:
    """label -> phase directory, in pipeline order (incubated modules sorted by index, not by text)."""
    out = {"meta": run_dir / "meta"}
    inc = run_dir / "incubate"
    if inc.is_dir():
        mods = sorted((int(d.name.split("-")[1]), d) for d in inc.iterdir()
                      if d.is_dir() and d.name.startswith("module-") and d.name.split("-")[1].isdigit())
        out.update({f"incubate[{k}]": d for k, d in mods})
    out.update({"assemble": run_dir / "assemble", "e2e": run_dir / "e2e"})
    return out


NAMES = {"meta": "meta model", "assemble": "assembled (after fine-tune)", "e2e": "E2E baseline"}


def _name(label: str) -> str:
    if label.startswith("incubate["):
        return f"hybrid {label[9:-1]} (after incubation)"
    return NAMES[label]


def _median_mfu(records: list[dict]) -> float | None:
    """Median MFU of a phase's training log lines (each: model FLOP/s per rank over the device's peak)."""
    mfu = sorted(r["mfu"] for r in records if r.get("kind") == "train" and r.get("mfu") is not None)
    return mfu[len(mfu) // 2] if mfu else None


def collect(run_dir: str | Path) -> list[dict]:
    """Table rows in pipeline order; a phase not finished yet shows as empty."""
    rows, spent, spent_flops = [], 0.0, 0.0
    for label, d in _phase_dirs(Path(run_dir)).items():
        manifest = read_manifest(d / "export")
        m = manifest["metrics"] if manifest else {}
        hours, flops = m.get("device_hours"), m.get("train_flops")
        if label == "e2e":
            cumulative, cumulative_flops = hours, flops
        else:
            spent += hours or 0.0
            spent_flops += flops or 0.0
            cumulative, cumulative_flops = (spent, spent_flops) if manifest else (None, None)
        rows.append({"label": label, "model": _name(label), "top1": m.get("top1"), "top5": m.get("top5"),
                     "device_hours": hours, "cumulative": cumulative, "world": m.get("world"),
                     "flops": flops, "cumulative_flops": cumulative_flops,
                     "mfu": _median_mfu(read_jsonl(d / "metrics.jsonl")) if manifest else None})
    return rows


def _f(v, spec):
    return "—" if v is None else format(v, spec)


def _pct(v, spec):
    return _f(None if v is None else 100 * v, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'model':<30} {'top-1 %':>8} {'top-5 %':>8} {'device-h':>9} {'cumul. device-h':>16} "
            f"{'train FLOPs':>12} {'cumul. FLOPs':>13} {'MFU %':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<30} {_f(r['top1'], '8.2f')} {_f(r['top5'], '8.2f')} "
                     f"{_f(r['device_hours'], '9.4f')} {_f(r['cumulative'], '16.4f')} {_f(r.get('flops'), '12.3e')} "
                     f"{_f(r.get('cumulative_flops'), '13.3e')} {_pct(r.get('mfu'), '6.1f')}")
    lines.append("cumul.: the pipeline up to that row (meta + incubations + fine-tune); E2E counts alone. device-h: "
                 "measured (wall x ranks); FLOPs: counted training FLOPs (modasm/perf.py). MFU: median over the "
                 "phase's training log lines.")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | top-1 % | top-5 % | device-hours | cumulative device-hours | train FLOPs | cumulative FLOPs "
             "| MFU % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {_f(r['top1'], '.2f')} | {_f(r['top5'], '.2f')} | "
                     f"{_f(r['device_hours'], '.4f')} | {_f(r['cumulative'], '.4f')} | {_f(r.get('flops'), '.3e')} | "
                     f"{_f(r.get('cumulative_flops'), '.3e')} | {_pct(r.get('mfu'), '.1f')} |")
    return "\n".join(lines)


def _records(run_dir: Path) -> dict[str, list[dict]]:
    return {label: read_jsonl(d / "metrics.jsonl") for label, d in _phase_dirs(run_dir).items()}


def _series(recs: list[dict], kind: str, x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in recs if r.get("kind") == kind and r.get(x) is not None and r.get(y) is not None]
    # a resumed phase may repeat steps it had logged before the interruption: keep the last of each x
    dedup = dict(pts)
    xs = sorted(dedup)
    return xs, [dedup[v] for v in xs]


def plot(run_dir: Path, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = _records(run_dir)
    inc = [k for k in recs if k.startswith("incubate[")]
    files = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, style in [("e2e", dict(color="tab:red", marker="o")), ("meta", dict(color="tab:gray", marker="s")),
                         ("assemble", dict(color="tab:blue", marker="o"))]:
        xs, ys = _series(recs[label], "eval", "pipeline_device_hours", "top1")
        if xs:
            ax.plot(xs, ys, label=_name(label), **style)
    for k in inc:
        xs, ys = _series(recs[k], "eval", "pipeline_device_hours", "top1")
        if xs:
            ax.plot(xs, ys, linestyle="--", marker=".", alpha=0.7, label=_name(k))
    start = [r for r in recs["assemble"] if r.get("kind") == "start"]
    if start:
        ax.axvline(start[0]["base_hours"], color="tab:blue", linestyle=":", linewidth=1)
    ax.set_xlabel("cumulative device-hours of the pipeline (wall time x ranks)")
    ax.set_ylabel("validation top-1 %")
    ax.set_title("Accuracy vs cost: assembled path vs end-to-end")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    files.append(save_figure(fig, out / "accuracy_vs_cost.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in inc:
        a1.plot(*_series(recs[k], "eval", "epoch", "top1"), marker="o", label=_name(k))
        a2.plot(*_series(recs[k], "train", "step", "loss"), label=_name(k))
    a1.set(xlabel="epoch", ylabel="validation top-1 % of the hybrid", title="Incubation: each module in its hybrid")
    a2.set(xlabel="optimizer step", ylabel="training loss", title="Incubation loss")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    files.append(save_figure(fig, out / "incubation.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in ["meta", *inc, "assemble", "e2e"]:
        xs, ys = _series(recs[label], "train", "step", "loss")
        if xs:
            ax.plot(xs, ys, label=_name(label), linestyle="--" if label in inc else "-")
    ax.set(xlabel="optimizer step (of each phase)", ylabel="training loss", title="Training loss per phase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    files.append(save_figure(fig, out / "loss.png"))
    return files


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG (tight layout, 110 dpi) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "meta").is_dir() and not (run_dir / "e2e").is_dir():
        raise UserError(f"{run_dir} holds no phase output (expected meta/ or e2e/): pass runs/<run.name>")
    out = run_dir / "report"
    rows = collect(run_dir)
    plots = plot(run_dir, out)
    text = [f"# Report: {run_dir.name}", "", markdown_table(rows), "",
            "Cumulative device-hours: device time (wall time x ranks) of the pipeline up to that row "
            "(meta + incubations + fine-tune); the E2E baseline counts alone. Train FLOPs: counted (the phase's "
            "model's training FLOPs per image x the images it trained on; modasm/perf.py), deterministic; cumulative "
            "like the device-hours. MFU: model FLOP/s per device over its peak, median over the phase's training log "
            "lines.", ""]
    captions = {
        "accuracy_vs_cost.png": "Accuracy vs cost. Each point is an evaluation, placed at the device-hours the "
        "whole pipeline had spent by then. The assembled curve starts where meta + all incubations ended "
        "(dotted line); the E2E curve starts at zero. Left of and above the other curve is better.",
        "incubation.png": "Incubation: each module trained inside its hybrid (meta model with that module in "
        "place of one meta block); left, the hybrid's validation accuracy; right, its training loss.",
        "loss.png": "Training loss of every phase against its own optimizer steps.",
    }
    for p in plots:
        text += [f"![{p.stem}]({p.name})", "", captions[p.name], ""]
    (out / "report.md").write_text("\n".join(text))
    return out / "report.md"
