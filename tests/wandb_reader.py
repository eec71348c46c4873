"""Read an offline W&B run file back (tests only; no server needed).

wandb 0.31 ships no Python reader for its run files (its old ``wandb.sdk.internal.datastore`` is gone; the
Go core writes them), so this reads the format directly: W&B's 7-byte header, then a LevelDB-style log
(32 KiB blocks of chunks: crc32, length, type FULL/FIRST/MIDDLE/LAST) of ``wandb_internal_pb2.Record``s.
"""
import struct
from pathlib import Path


def read_wandb_offline(path: str | Path):
    """Yield the ``wandb_internal_pb2.Record``s of an offline ``run-*.wandb`` file."""
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
