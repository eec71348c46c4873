"""Metrics: JSON lines per phase, W&B (offline unless configured), progress, device-time accounting.

Only the main rank of a group writes. Every record carries the phase's wall and device seconds
(device = wall x ranks) and the pipeline's cumulative device-hours so far, so accuracy and cost
share one axis ("accuracy vs GPU-hours"). JSON lines are the source of truth (the report reads
only them); W&B mirrors them for dashboards.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .errors import UserError
from .integrity import SPACE_ERRNOS
from .redact import redact


class CostClock:
    """Wall and device time of one phase, accumulated across resumes; device time = wall x ranks.

    ``base_hours`` is the device time the pipeline spent before this phase (e.g. meta + all
    incubations for the fine-tune), so ``pipeline_hours`` is the cumulative cost so far.
    """

    def __init__(self, world: int, wall: float = 0.0, device: float = 0.0, base_hours: float = 0.0,
                 now: Callable[[], float] = time.perf_counter):
        self.world, self.wall, self.device, self.base_hours, self._now = world, wall, device, base_hours, now
        self._mark = now()

    def tick(self) -> None:
        now = self._now()
        self.wall += now - self._mark
        self.device += (now - self._mark) * self.world
        self._mark = now

    @property
    def device_hours(self) -> float:
        return self.device / 3600

    @property
    def pipeline_hours(self) -> float:
        return self.base_hours + self.device_hours

    def fields(self) -> dict:
        return {"wall_seconds": self.wall, "device_seconds": self.device,
                "device_hours": self.device_hours, "pipeline_device_hours": self.pipeline_hours}


def fmt_eta(seconds: float) -> str:
    """h:mm:ss (days spelled out), as the standard library writes a duration."""
    return str(datetime.timedelta(seconds=max(0, int(seconds))))


class Progress:
    """Progress of a piece of work counted in ``unit``s, metered by tqdm (count, smoothed rate, ETA).

    On a terminal (``mode`` 'bar', or 'auto' on a tty) tqdm draws a live bar and ``show`` sets its text;
    otherwise (log files, Slurm output) tqdm only meters and ``show`` prints one plain line.
    """

    def __init__(self, label: str, total: float, initial: float = 0, unit: str = "img", mode: str = "auto",
                 stream=sys.stdout):
        self.label, self.stream = label, stream
        self.bar = mode == "bar" or (mode == "auto" and stream.isatty())
        self._sink = None if self.bar else open(os.devnull, "w")
        self.meter = tqdm(total=total, initial=initial, unit=unit, file=stream if self.bar else self._sink,
                          desc=f"[{label}]", dynamic_ncols=True, mininterval=0.5 if self.bar else 0.0)

    def advance(self, n: float) -> None:
        self.meter.update(n)

    @property
    def rate(self) -> float:
        """Units per second: tqdm's smoothed rate (the average so far until it has one)."""
        d = self.meter.format_dict
        if d["rate"]:
            return d["rate"]
        return (d["n"] - d["initial"]) / d["elapsed"] if d["elapsed"] else 0.0

    @property
    def eta(self) -> float:
        d, rate = self.meter.format_dict, self.rate
        return (d["total"] - d["n"]) / rate if rate and d["total"] else 0.0

    def show(self, text: str) -> None:
        if self.bar:
            self.meter.set_postfix_str(text)
        else:
            print(f"[{self.label}] {text}", file=self.stream, flush=True)

    def say(self, msg: str) -> None:
        line = f"[{self.label}] {msg}"
        tqdm.write(line, file=self.stream) if self.bar else print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.meter.close()
        if self._sink is not None:
            self._sink.close()


# ---------------------------------------------------------------- W&B


# W&B's service process, when this process was started by one that runs W&B itself (its address is inherited).
_INHERITED_SERVICE = os.environ.get("WANDB_SERVICE")


def wandb_mode(configured: str) -> str:
    return os.environ.get("WANDB_MODE", configured)


def wandb_run_id(group: str, label: str, out: Path) -> str:
    """The W&B run id of a phase's first start (stable per phase output). A resumed phase continues the id
    recorded in its checkpoint (``WandbRun(run_id=...)``), whatever this gives then."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{group}-{label}").strip("-")
    return f"{slug}-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:8]}"


class WandbRun:
    """One W&B run per phase (per module for incubation), grouped per pipeline, job_type = phase."""

    def __init__(self, cfg, *, run_dir: Path, group: str, job_type: str, label: str, out: Path, config: dict,
                 run_id: str | None = None):
        """``run_id``: the run a resumed phase continues (kept with its resume state); None: a first start."""
        import wandb  # imported only when used: a disabled logger costs nothing
        mode = wandb_mode(cfg.mode)
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            raise UserError("logging.wandb.mode is 'online' but no W&B API key is configured: run `wandb login` "
                             "or set WANDB_API_KEY, or keep mode 'offline' and `wandb sync` the runs later")
        run_dir.mkdir(parents=True, exist_ok=True)
        if _INHERITED_SERVICE and os.environ.get("WANDB_SERVICE") == _INHERITED_SERVICE:
            # a service of our own, which ends with this process: a parent's would outlive a SIGKILLed phase and
            # keep its run id "in use", and the resumed phase would have to log to another run
            os.environ.pop("WANDB_SERVICE")
        self.wandb, self.group = wandb, group
        kw = dict(mode=mode, project=cfg.project, entity=cfg.entity or None, group=group, job_type=job_type,
                  name=label, config=redact(config), dir=str(run_dir),
                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        run_id = run_id or wandb_run_id(group, label, out)
        with _redacted_argv():  # W&B records the command line
            self.run = self._init(run_id, kw)
        self.id = self.run.id  # kept with the resume state (also after a failure ends the mirror)
        # accuracy charts default to the cost axis: cumulative device-hours of the whole pipeline
        self.run.define_metric("cost/pipeline_device_hours")
        self.run.define_metric("eval/*", step_metric="cost/pipeline_device_hours", step_sync=True)

    def _init(self, run_id: str, kw: dict, waits: tuple = (1, 2, 4, 8)):
        for wait in waits:
            try:
                return self.wandb.init(id=run_id, resume="allow", **kw)
            except Exception as e:  # online: a killed predecessor may hold the id on the server for a while
                if "in use" not in str(e):
                    raise
                time.sleep(wait)
        other = f"{run_id}-{int(time.time())}"
        print(f"[wandb] run {run_id} is still in use after {sum(waits)} s; logging to run {other} instead (a separate "
              "curve; the phase's checkpoints record it, so resuming continues it)", flush=True)
        return self.wandb.init(id=other, **kw)

    # W&B mirrors metrics.jsonl; it must never stop training. Its service is a separate process, which dies with
    # the rest of a job step on a preemption's SIGTERM while the ranks still have a checkpoint to save: after a
    # failure the mirror stops (one line says so) and the run goes on; a resumed phase re-sends what W&B missed
    # (MetricsLog.backfill_wandb).

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 (whatever wandb raises: connection lost, service gone, ...)
            print(redact(f"[wandb] {what} failed ({type(e).__name__}: {e}); W&B logging stops, metrics.jsonl goes on"),
                  file=sys.stderr, flush=True)
            self.run = None

    def log(self, record: dict, step: int) -> None:
        self._guard("log", lambda: self.run.log(record, step=step))

    def log_shards(self, label: str, export_dir: Path) -> None:
        """The shard set as an artifact: its manifest, and the weights by reference (not copied)."""
        def log():
            art = self.wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.group}-{label}-shards"), type="shards")
            art.add_file(str(export_dir / "manifest.json"))
            art.add_reference(f"file://{export_dir.resolve()}", name="weights", checksum=False)
            self.run.log_artifact(art)
        self._guard("artifact", log)

    def finish(self) -> None:
        self._guard("finish", lambda: self.run.finish())
        self.run = None


@contextlib.contextmanager
def _redacted_argv():
    saved = sys.argv[:]
    sys.argv[:] = redact(saved)
    try:
        yield
    finally:
        sys.argv[:] = saved


def _netrc_has_wandb() -> bool:
    import netrc
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in h for h in hosts)


_WANDB_KEYS = {"train": {"loss": "train/loss", "lr": "train/lr", "img_per_s": "train/img_per_s",
                         "grad_norm": "train/grad_norm", "bad_samples": "data/bad_samples",
                         "tflops": "perf/tflops", "mfu": "perf/mfu"},
               "nonfinite": {"count": "train/nonfinite_steps"},
               "eval": {"top1": "eval/top1", "top5": "eval/top5", "eval_loss": "eval/loss",
                        "eval_bad_samples": "data/eval_bad_samples"}}
_COST_KEYS = {"device_hours": "cost/device_hours", "pipeline_device_hours": "cost/pipeline_device_hours",
              "wall_seconds": "cost/wall_seconds", "train_flops": "cost/train_flops",
              "pipeline_train_flops": "cost/pipeline_train_flops"}


class MetricsLog:
    """Append-only JSON-lines log of one phase (``metrics.jsonl``), W&B mirror, terminal progress."""

    def __init__(self, path: str | Path, phase: str, enabled: bool, progress: str = "auto",
                 wandb_run: WandbRun | None = None, stream=sys.stdout):
        self.path, self.phase, self.enabled = Path(path), phase, enabled
        self.mode, self.stream = progress, stream
        self.progress: Progress | None = None  # the phase's meter, from meter()
        self.wandb = wandb_run if enabled else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"phase": self.phase, "kind": kind, "time": round(time.time(), 3), **fields}
        try:
            with open(self.path, "a") as f:
                f.write(redact(json.dumps(rec)) + "\n")
        except OSError as e:
            if e.errno not in SPACE_ERRNOS:
                raise
            raise UserError(f"{self.path}: appending a {kind} record failed ({e.strerror}); free space (or raise "
                            "the quota) and re-run the same command to resume") from None
        self._mirror(kind, fields)

    def _mirror(self, kind: str, fields: dict) -> None:
        if self.wandb is not None and "step" in fields:
            keys = {**_WANDB_KEYS.get(kind, {}), **_COST_KEYS}
            out = {keys[k]: v for k, v in fields.items() if k in keys and v is not None}
            if out:
                self.wandb.log(out, step=fields["step"])

    def backfill_wandb(self, upto: int) -> None:
        """Re-send this phase's records up to step ``upto`` (a resumed checkpoint's) from metrics.jsonl to W&B.

        A SIGKILLed process takes its W&B service with it, and the service drops what it had not yet written to
        the run file (offline) or sent: often everything since the start. The JSON lines are written as they
        come, so the resumed run, which continues the same W&B run id, re-sends what it resumes from: one curve
        from step 1. W&B ignores a step it already has (the values are the same: resume is exact)."""
        if self.wandb is None:
            return
        last = {}
        for rec in read_jsonl(self.path):
            step = rec.get("step")
            if rec.get("kind") in _WANDB_KEYS and isinstance(step, int) and step <= upto:
                last[(step, rec["kind"])] = rec  # a step logged again after an earlier resume: the later record
        order = {kind: i for i, kind in enumerate(_WANDB_KEYS)}
        for (_, kind), rec in sorted(last.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
            self._mirror(kind, rec)

    def meter(self, total: float, done: float = 0, unit: str = "img") -> None:
        """Start the phase's progress meter (a bar or plain lines, per ``logging.progress``)."""
        if self.enabled:
            self.progress = Progress(self.phase, total, done, unit, self.mode, self.stream)

    def advance(self, n: float) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def rate_eta(self) -> tuple[float, str]:
        """(units per second, ETA as h:mm:ss) of the meter; (0, '') on ranks that do not log."""
        if self.progress is None:
            return 0.0, ""
        return self.progress.rate, fmt_eta(self.progress.eta)

    def show(self, text: str) -> None:
        if self.progress is not None:
            self.progress.show(text)

    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.say(msg)
        else:
            print(f"[{self.phase}] {msg}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


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
