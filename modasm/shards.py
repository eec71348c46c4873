"""The one hand-off format between phases: per-module safetensors + ``manifest.json``.

A shard set is a directory with one ``module-XX.safetensors`` per module it holds and a manifest
(format version, model shape, split, layout, phase, step, sha256 of each file, recipe, metrics).
Files are written to a temporary name, fsynced and renamed; the manifest is written last, so a
directory without a manifest is not a checkpoint. Readers check the manifest against what the
caller expects and every file's hash before any tensor reaches a model. Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import faults
from .integrity import atomic_write, sha256
from .config import ModelConfig
from .errors import UserError
from .redact import redact

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The model fields that decide whether a tensor fits: a shard from another width is refused.
SHAPE_KEYS = ("embed_dim", "num_heads", "patch_size", "img_size", "in_chans", "num_classes",
              "mlp_ratio", "qkv_bias")


class ShardError(UserError):
    """A shard set that must not be loaded; the message names the file and the mismatch."""


def module_file(m: int) -> str:
    return f"module-{m:02d}.safetensors"


def model_shape(cfg: ModelConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in SHAPE_KEYS}


def save_shards(directory: str | Path, modules: dict[int, dict[str, torch.Tensor]], *,
                model_cfg: ModelConfig, layout: list[int], phase: str, step: int,
                recipe: dict, metrics: dict) -> Path:
    """Write a shard set atomically (tensors first, manifest last). Returns the manifest path.

    Secrets of the environment in the recipe or metrics are redacted (redact.py). A write that fails for lack
    of space is one line naming the file and the bytes needed."""
    directory = Path(directory)
    needed = sum(v.numel() * v.element_size() for s in modules.values() for v in s.values())
    try:
        return _save_shards(directory, modules, model_cfg=model_cfg, layout=layout, phase=phase, step=step,
                            recipe=redact(recipe), metrics=redact(metrics))
    except Exception as e:  # re-raised unless it is a lack of space
        from .integrity import space_error
        path = Path(getattr(e, "filename", None) or directory)
        err = space_error(e, path, needed, "the shard set", "the set has no manifest, so nothing takes it for a "
                          "complete one: free space (or raise the quota) and re-run the same command to export it")
        if err is None:
            raise
        for tmp in directory.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
        raise ShardError(str(err)) from e


def _save_shards(directory: Path, modules, *, model_cfg, layout, phase, step, recipe, metrics) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # an incomplete rewrite must not look complete
    entries = []
    for m, state in sorted(modules.items()):
        path = directory / module_file(m)
        atomic_write(path, lambda tmp, s=state: save_file({k: v.contiguous() for k, v in s.items()}, str(tmp)))
        faults.file_written("export")
        entries.append({"index": m, "file": path.name, "sha256": sha256(path),
                        "tensors": {k: list(v.shape) for k, v in sorted(state.items())}})
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": model_shape(model_cfg),
        "split": list(model_cfg.split),
        "layout": list(layout),
        "phase": phase,
        "step": int(step),
        "modules": entries,
        "recipe": recipe,
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest["manifest_sha256"] = _self_digest(manifest)
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return directory / MANIFEST


# Required manifest keys and their JSON types; every module entry needs _ENTRY's.
_MANIFEST_KEYS = {"format_version": int, "model": dict, "split": list, "layout": list, "phase": str, "step": int,
                  "modules": list, "recipe": dict, "metrics": dict}
_ENTRY_KEYS = {"index": int, "file": str, "sha256": str, "tensors": dict}


def _self_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest: any edited byte is caught."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a complete shard set, or None if the directory holds none.

    Raises ShardError (naming the file) for a manifest that is not valid JSON, lacks a key, or whose
    content does not match its own digest.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: manifest is not valid JSON ({e}); re-run the phase that wrote it") from None
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: manifest is not a JSON object; re-run the phase that wrote it")
    problems = [f"key '{k}' missing or not {t.__name__}" for k, t in _MANIFEST_KEYS.items()
                if not isinstance(manifest.get(k), t)]
    for i, e in enumerate(manifest.get("modules") or []):
        problems += [f"modules[{i}].{k} missing or not {t.__name__}" for k, t in _ENTRY_KEYS.items()
                     if not isinstance(e, dict) or not isinstance(e.get(k), t)]
        if isinstance(e, dict) and isinstance(e.get("file"), str) and Path(e["file"]).name != e["file"]:
            problems.append(f"modules[{i}].file {e['file']!r} is not a file name in this directory")
    if problems:
        raise ShardError(f"{path}: malformed manifest ({'; '.join(problems[:3])}); re-run the phase that wrote it")
    if manifest.get("manifest_sha256") != _self_digest(manifest):
        raise ShardError(f"{path}: manifest content does not match its manifest_sha256 (corrupt or edited); "
                         "re-run the phase that wrote it")
    return manifest


def verify(directory: str | Path, *, model_cfg: ModelConfig, modules: list[int],
           phase: str | None = None) -> dict:
    """Check a shard set before use; returns its manifest. Raises ShardError naming the problem."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = directory / MANIFEST
    if manifest is None:
        what = "does not exist" if not directory.exists() else "has no manifest.json (incomplete or not a shard set)"
        raise ShardError(f"{directory}: shard set {what}; run the phase that produces it first")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{where}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    if phase is not None and manifest.get("phase") != phase:
        raise ShardError(f"{where}: written by phase {manifest.get('phase')!r}, expected {phase!r}")
    want = model_shape(model_cfg)
    for key, value in want.items():
        got = manifest["model"].get(key)
        if got != value:
            raise ShardError(f"{where}: model.{key} is {got!r} in the shard set but {value!r} in the recipe")
    if manifest["split"] != list(model_cfg.split):
        raise ShardError(f"{where}: split {manifest['split']} in the shard set but {list(model_cfg.split)} "
                         "in the recipe")
    have = {e["index"]: e for e in manifest["modules"]}
    for m in modules:
        if m not in have:
            raise ShardError(f"{where}: module {m} is missing (the set holds modules {sorted(have)})")
        entry = have[m]
        path = directory / entry["file"]
        if not path.is_file():
            raise ShardError(f"{path}: file of module {m} is missing")
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise ShardError(f"{path}: sha256 {digest[:12]}… does not match the manifest's "
                             f"{entry['sha256'][:12]}… (corrupt or modified file); re-run the phase that wrote it")
    return manifest


def load_modules(directory: str | Path, *, model_cfg: ModelConfig, modules: list[int],
                 phase: str | None = None) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """Verify, then load the given modules' tensors (safetensors, no pickle)."""
    directory = Path(directory)
    manifest = verify(directory, model_cfg=model_cfg, modules=modules, phase=phase)
    entries = {e["index"]: e for e in manifest["modules"]}
    out = {}
    for m in modules:
        path = directory / entries[m]["file"]
        tensors = load_file(str(path))
        declared = {k: list(v) for k, v in entries[m]["tensors"].items()}
        actual = {k: list(v.shape) for k, v in tensors.items()}
        if declared != actual:
            raise ShardError(f"{path}: tensors differ from the manifest's list")
        out[m] = tensors
    return out, manifest
