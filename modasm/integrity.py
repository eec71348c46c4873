"""Resume checkpoints are trusted before anything unpickles them; a full disk is named, not a traceback.

DeepSpeed's checkpoints are pickles, and unpickling runs whatever code a file asks for. So a checkpoint is
*sealed* when it is saved: every file of its directory is digested (sha256; each rank digests the files it
wrote, the main rank the rest) and the digests go into its ``COMPLETE`` marker, which the main rank signs
(HMAC-SHA256) with a key kept outside the run directory (``~/.config/modasm/checkpoint.key``, made on first
use, mode 0600; ``$MODASM_CHECKPOINT_KEY`` names another file, e.g. on a cluster whose home is not shared).
Before DeepSpeed loads a checkpoint, or converts it to a universal one (which unpickles too), it is
*verified*: the marker's signature, no file that was not there at save time, no file missing, every digest
(each rank checks a share of the files). Anything else is refused with a ``CheckpointError`` naming the file,
and nothing was unpickled. A planted file in a checkpoint, a replaced one, or a whole planted checkpoint
directory with a forged marker never runs. A run directory from elsewhere (another user or machine) is
refused too; ``MODASM_TRUST_CHECKPOINTS=1`` accepts a marker this key did not sign (its digests are still
checked): set it once for a checkpoint you trust.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import resource
import secrets
import shutil
from pathlib import Path

import torch.distributed as dist

from .errors import UserError

COMPLETE = "COMPLETE"
KEY_ENV = "MODASM_CHECKPOINT_KEY"
TRUST_ENV = "MODASM_TRUST_CHECKPOINTS"


class CheckpointError(UserError):
    """A resume checkpoint that must not be loaded; the message names the file and what is wrong."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (the digest of shard manifests and checkpoint markers alike)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, fsync it, rename it to ``path`` and fsync the
    directory: ``path`` is whole (old or new) after a crash at any point, never half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "modasm" / "checkpoint.key")


def _key(create: bool) -> bytes | None:
    path = key_path()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def _mac(marker: dict, key: bytes) -> str:
    body = json.dumps({k: v for k, v in marker.items() if k != "mac"}, sort_keys=True).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def files_of(directory: Path) -> list[str]:
    """Every file under ``directory`` but the marker, as sorted relative paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != COMPLETE)


def write_marker(directory: Path, marker: dict, digests: dict[str, str]) -> None:
    """Complete ``directory``: its marker with every file's digest (the ones given, the others computed
    here), signed, written atomically (a marker is whole or absent)."""
    files = {name: digests.get(name) or sha256(directory / name) for name in files_of(directory)}
    files.update({k: v for k, v in digests.items() if k not in files})  # written by a rank, not listed here yet
    marker = {**marker, "files": dict(sorted(files.items()))}
    marker["mac"] = _mac(marker, _key(create=True))
    atomic_write(directory / COMPLETE, lambda tmp: tmp.write_text(json.dumps(marker)))


def read_marker(directory: Path) -> dict:
    path = directory / COMPLETE
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid checkpoint marker ({e}); move {directory} aside to resume "
                              "from the previous checkpoint") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"{path}: not a valid checkpoint marker; move {directory} aside")
    return marker


# ---------------------------------------------------------------- collectives of a rank's group


def _gather(obj, info) -> list:
    if info.world == 1:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj, group=info.group)
    return out


def _broadcast(obj, info):
    if info.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=info.group)
    return box[0]


def seal(directory: Path, marker: dict, written: list[Path], info) -> None:
    """Collective: every rank digests the files it wrote; the main rank writes the signed marker."""
    mine = {p.relative_to(directory).as_posix(): sha256(p) for p in written if p.is_relative_to(directory)}
    every = {}
    for part in _gather(mine, info):
        every.update(part)
    if info.is_main:
        write_marker(directory, marker, every)


def _check_marker(directory: Path, marker: dict) -> str | None:
    """Main rank: what is wrong with the marker and the directory's file list, or None."""
    trust = os.environ.get(TRUST_ENV) == "1"
    files = marker.get("files")
    if not isinstance(files, dict) or "mac" not in marker:
        if trust:
            return None
        return (f"{directory / COMPLETE}: records no file digests (saved by an older modasm, or not by modasm); "
                "DeepSpeed's loader unpickles these files, which can run code, so nothing was loaded. If the "
                f"checkpoint is your own, re-run with {TRUST_ENV}=1 to resume from it; otherwise move "
                f"{directory} aside")
    key = _key(create=False)
    if not trust and (key is None or not hmac.compare_digest(str(marker["mac"]), _mac(marker, key))):
        why = "no checkpoint key exists here" if key is None else "its signature does not match"
        return (f"{directory / COMPLETE}: not signed with this machine's checkpoint key {key_path()} ({why}): "
                "the checkpoint was saved by another user or machine (a copied run directory), or the marker was "
                "edited; DeepSpeed's loader unpickles it, so nothing was loaded. If you trust it, re-run with "
                f"{TRUST_ENV}=1 (its file digests are still checked), or point {KEY_ENV} at the key it was saved "
                f"with; otherwise move {directory} aside")
    on_disk = files_of(directory)
    extra = [f for f in on_disk if f not in files]
    if extra:
        return (f"{directory / extra[0]}: not part of the checkpoint as saved (no digest in its COMPLETE marker): "
                f"a planted or foreign file; nothing was unpickled. Remove it, or move {directory} aside")
    missing = [f for f in files if f not in on_disk]
    if missing:
        return (f"{directory / missing[0]}: missing from the checkpoint (recorded at save time); move {directory} "
                "aside to resume from the previous checkpoint")
    return None


def problem(directory: Path) -> str | None:
    """What is wrong with ``directory``'s marker and file list (not the digests), or None (main rank)."""
    try:
        return _check_marker(directory, read_marker(directory))
    except CheckpointError as e:
        return str(e)


def verify(directory: Path, marker: dict, info) -> None:
    """Collective: raise CheckpointError on every rank unless ``directory`` is what was saved and sealed."""
    problem = _check_marker(directory, marker) if info.is_main else None
    problem, files = _broadcast((problem, marker.get("files") if info.is_main else None), info)
    if problem is None and files:
        names = sorted(files)[info.rank::info.world]
        bad = [(n, d) for n in names if (d := sha256(directory / n)) != files[n]]
        bad = [b for part in _gather(bad, info) for b in part]
        if bad:
            name, got = bad[0]
            problem = (f"{directory / name}: sha256 {got[:12]}… does not match the digest recorded when the "
                       f"checkpoint was saved ({files[name][:12]}…): corrupt or replaced; nothing was unpickled. "
                       f"Move {directory} aside to resume from the previous checkpoint")
    if problem is not None:
        raise CheckpointError(problem)
    if info.is_main and os.environ.get(TRUST_ENV) == "1" and not files:
        print(f"[checkpoint] {directory}: loaded without digests ({TRUST_ENV}=1)", flush=True)


# ---------------------------------------------------------------- a write that fails for lack of space

SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk, a quota, a file size limit


def _errno(exc: BaseException | None) -> int | None:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def space_error(exc: BaseException, path: Path, needed: int, what: str, after: str) -> UserError | None:
    """A one-line error for a write of ``what`` at ``path`` that failed for lack of space (a full disk, a quota,
    a file size limit), or None when ``exc`` is something else. ``after`` says what stays intact and what to do."""
    code = _errno(exc)
    text = str(exc)
    where = path if path.exists() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limited = limit != resource.RLIM_INFINITY and limit < needed
    spaceish = code in SPACE_ERRNOS or any(s in text for s in ("No space left", "Disk quota", "File too large"))
    # torch.save's writer loses the errno ("unexpected pos ..."): what is left free (its partial file still there)
    # or the file size limit tells
    if not (spaceish or free < needed or limited):
        return None
    cause = (os.strerror(code) if code in SPACE_ERRNOS else
             f"file size limit {limit} bytes, ulimit -f" if limited and free >= needed else "no space left")
    said = text.strip().splitlines()[-1][:200] if text.strip() else ""
    return UserError(f"{path}: writing {what} failed ({cause}; {type(exc).__name__}: {said}): it needs about {needed} "
                     f"bytes, {free} are free on that file system; {after}")
