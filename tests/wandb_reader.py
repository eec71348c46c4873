"""Read W&B offline runs back with wandb's own protobufs (no server): what the tests check W&B against.

wandb 0.31 ships no Python reader for its run files (its old ``wandb.sdk.internal.datastore`` is gone; the Go
core writes them), so ``read_wandb_offline`` reads the format itself.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path


def read_wandb_offline(path: str | Path):
    """Yield the ``wandb_internal_pb2.Record``s of an offline ``run-*.wandb`` file.

    The file is W&B's 7-byte header followed by a LevelDB-style log (32 KiB blocks of chunks: crc32,
    length, type FULL/FIRST/MIDDLE/LAST).
    """
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def offline_runs(run_dir: str | Path) -> dict[str, dict]:
    """{run id: {name, group, job_type, config, history keys, artifacts, files}} of every offline run.

    Keyed by the run id, not the display name: two runs of one phase under two ids stay two entries.
    ``files`` lists the run-*.wandb files of that id: one per process that wrote it (a resumed phase
    continues its run in a new file; two writers of one phase at once also make two files).
    """
    runs = {}
    for f in sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb")):
        info = {"history": set(), "config": {}, "artifacts": [], "files": [f]}
        for rec in read_wandb_offline(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, group=rec.run.run_group, job_type=rec.run.job_type,
                            name=rec.run.display_name)
                info["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "config":
                info["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
            elif kind == "history":
                info["history"] |= {i.key or "/".join(i.nested_key) for i in rec.history.item}
            elif kind == "artifact":
                info["artifacts"].append((rec.artifact.type, {c.path: c.ref for c in rec.artifact.manifest.contents}))
        assert info.get("id"), f"{f}: no run record (a writer that never finished its run?)"
        if info["id"] in runs:  # the same run continued in another file
            run = runs[info["id"]]
            run["files"] += info["files"]
            run["config"].update(info["config"])
            run["history"] |= info["history"]
            run["artifacts"] += info["artifacts"]
        else:
            runs[info["id"]] = info
    return runs
