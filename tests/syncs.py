"""Count the host syncs a block of code makes, on any device: each call that makes the host wait for the device.

On a GPU ``torch.cuda.set_sync_debug_mode`` sees synchronising CUDA calls; on a CPU there is no stream to wait
for, so this counts the *calls* that would sync on a GPU, each with where it came from:

* device-to-host reads: ``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``/``__int__``/``__float__``/
  ``__index__``/``__format__``/``__repr__``/``__array__``, ``torch.equal``, ``allclose``, ``is_nonzero``;
* ops whose output size depends on the data: ``nonzero``, ``argwhere``, ``masked_select``, ``unique``,
  ``bincount``, ``repeat_interleave`` (tensor repeats), one-argument ``where``, indexing with a boolean mask (but
  ``x[mask] = number``, which torch runs as ``masked_fill_``) or with a Python list / numpy array (host indices
  copied to the device);
* host-to-device copies of host-built data: ``torch.tensor``/``torch.as_tensor(data, device=...)`` and
  ``Tensor.new_tensor`` of anything that is not a tensor (a blocking copy from pageable memory);
* ``torch.cuda.synchronize``, ``torch.cuda.Stream/Event.synchronize`` and DeepSpeed's accelerator
  ``synchronize`` (a no-op on its CPU accelerator, a device sync on CUDA).

Not seen: copies through ``Tensor.to``/``copy_`` (on a CPU run every tensor is a host tensor, so a host-to-device
copy cannot be told from a no-op), and syncs inside C++ kernels (nvJPEG, NCCL). Calls inside ``torch.optim`` (torch
keeps an optimizer's ``state['step']`` on the host unless it is capturable or fused, and reads it there) and inside
the DataLoader's fetch (the dataset's own work on host tensors, in a worker process in a real run) are host work:
kept apart in ``host_calls``, not counted.

    with SyncCounter() as c:
        ...
    c.count("modasm"), c.summary()

``cuda_sync_warnings`` is CUDA's own count of the same block on a GPU (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
_READS = {T.item: "item", T.tolist: "tolist", T.cpu: "cpu", T.numpy: "numpy", T.__bool__: "__bool__",
          T.__int__: "__int__", T.__float__: "__float__", T.__index__: "__index__", T.__format__: "__format__",
          T.__repr__: "__repr__", T.__array__: "__array__", torch.equal: "equal", T.equal: "equal",
          torch.allclose: "allclose", T.allclose: "allclose", torch.is_nonzero: "is_nonzero",
          T.is_nonzero: "is_nonzero"}
_SHAPED = {torch.nonzero: "nonzero", T.nonzero: "nonzero", torch.argwhere: "argwhere", T.argwhere: "argwhere",
           torch.masked_select: "masked_select", T.masked_select: "masked_select", torch.unique: "unique",
           T.unique: "unique", torch.unique_consecutive: "unique_consecutive",
           T.unique_consecutive: "unique_consecutive", torch.bincount: "bincount", T.bincount: "bincount"}
_INDEXING = {T.__getitem__: "__getitem__", T.__setitem__: "__setitem__", T.index_put_: "index_put_",
             T.index_put: "index_put"}
_CREATE = {torch.tensor: "tensor", torch.as_tensor: "as_tensor"}

_TORCH = os.path.dirname(torch.__file__) + os.sep
_HOST = (os.path.join(_TORCH, "optim") + os.sep, os.path.join(_TORCH, "utils", "data") + os.sep)
_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep  # (some Pythons keep site-packages under it)
_HERE = os.path.abspath(__file__)
_PACKAGES = ("modasm", "deepspeed", "timm", "torchvision", "tests", "launch", "benchmarks")


@dataclass(frozen=True)
class Sync:
    what: str      # the call, e.g. "tolist", "tensor(host data, device=)", "synchronize"
    where: str     # the innermost frame outside torch and the standard library: "modasm/train.py:71 step_flags"
    package: str   # the package of that frame: modasm, deepspeed, timm, torchvision, tests, ... or other


def _origin() -> tuple[str, str, bool]:
    """(where, package, host work: torch.optim or the DataLoader's fetch on the stack) of the current call."""
    where, pkg, host = "?", "other", False
    f = sys._getframe(1)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        host = host or name.startswith(_HOST)
        stdlib = name.startswith(_STDLIB) and "-packages" + os.sep not in name
        if where == "?" and not (name.startswith(_TORCH) or stdlib or name == _HERE):
            parts = name.split(os.sep)
            pkg = next((p for p in reversed(parts[:-1]) if p in _PACKAGES), "other")
            short = os.sep.join(parts[len(parts) - 1 - parts[::-1].index(pkg):]) if pkg in parts else parts[-1]
            where = f"{short}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return where, pkg, host


def _host_data(x) -> bool:
    return not isinstance(x, torch.Tensor)


def _host_index(idx) -> str | None:
    """What makes an index sync: a boolean mask (data-dependent size) or host data (copied to the device)."""
    for i in (idx if isinstance(idx, tuple) else (idx,)):
        if isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0:
            return "boolean-mask index"
        if isinstance(i, (list, np.ndarray)):
            return "host-list index"
    return None


class SyncCounter(TorchFunctionMode):
    """A torch-function mode (plus the synchronize functions patched) recording every call that syncs."""

    def __init__(self):
        super().__init__()
        self.events: list[Sync] = []
        self.host_calls = 0
        self._patches = contextlib.ExitStack()

    def _record(self, what: str) -> None:
        where, pkg, host = _origin()
        if host:
            self.host_calls += 1
        else:
            self.events.append(Sync(what, where, pkg))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _READS.get(func) or _SHAPED.get(func)
        if what is None and func in _INDEXING and len(args) > 1:
            what = _host_index(args[1])
            if what == "boolean-mask index" and func is T.__setitem__ and isinstance(args[2], (int, float, bool)):
                what = None  # a number into a mask: masked_fill_, no sync
        elif what is None and func in _CREATE and args and _host_data(args[0]):
            device = kwargs.get("device", args[2] if func is torch.as_tensor and len(args) > 2 else None)
            what = None if device is None else f"{_CREATE[func]}(host data, device=)"
        elif what is None and func is T.new_tensor and len(args) > 1 and _host_data(args[1]):
            what = "new_tensor(host data)"
        elif what is None and func in (torch.where, T.where) and len(args) + len(kwargs) == 1:
            what = "where(condition)"
        elif what is None and func in (torch.repeat_interleave, T.repeat_interleave) and len(args) > 1 \
                and isinstance(args[1], torch.Tensor) and "output_size" not in kwargs:
            what = "repeat_interleave(tensor repeats)"
        if what is not None:
            self._record(what)
        return func(*args, **kwargs)

    def _patch(self, owner, name: str) -> None:
        inner = getattr(owner, name, None)
        if inner is None:
            return
        counter = self

        def synchronize(*args, **kwargs):
            counter._record("synchronize")
            return inner(*args, **kwargs)
        setattr(owner, name, synchronize)
        self._patches.callback(setattr, owner, name, inner)

    def __enter__(self):
        self._patch(torch.cuda, "synchronize")
        for cls in (getattr(torch.cuda, "Stream", None), getattr(torch.cuda, "Event", None)):
            if isinstance(cls, type):
                self._patch(cls, "synchronize")
        if "deepspeed" in sys.modules:
            from deepspeed.accelerator import get_accelerator
            self._patch(type(get_accelerator()), "synchronize")
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()

    def count(self, package: str | None = None) -> int:
        return sum(1 for e in self.events if package is None or e.package == package)

    def summary(self, package: str | None = None) -> dict[tuple[str, str], int]:
        """{(where, what): calls}, for messages."""
        return dict(collections.Counter((e.where, e.what) for e in self.events
                                        if package is None or e.package == package))


@contextlib.contextmanager
def cuda_sync_warnings():
    """CUDA's own count: ``torch.cuda.set_sync_debug_mode("warn")`` in the block; yields a list that gets a Sync
    (what: "cuda sync") for each synchronising CUDA call, with its origin. Without a GPU the mode does nothing and
    the list stays empty."""
    seen: list[Sync] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        inner = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchronizing CUDA operation" in str(message):
                where, pkg, _ = _origin()
                seen.append(Sync("cuda sync", where, pkg))
            else:
                inner(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        before = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
        if before is not None:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            if before is not None:
                torch.cuda.set_sync_debug_mode(before)
