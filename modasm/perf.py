"""Model FLOPs, device peaks and MFU: what a training step costs and how much of the device it uses.

``trace_step(model)`` runs one training step of a phase's model (forward, loss, backward) on a *meta copy*
(no memory, no arithmetic, no RNG draw, the real model untouched) under torch's ``FlopCounterMode`` and
a saved-tensor hook. Autograd decides what the backward computes from ``requires_grad``, so hybrid(k) is
counted as it runs: the frozen modules before k forward only, module k forward + full backward, the
frozen modules after k forward + input-gradient backward. Nothing about the method is assumed here.

Attention is counted as the fused kernel a GPU runs (flash / memory-efficient / cuDNN SDPA: torch's
formula, whose backward re-computes the scores: 2.5x the forward's two matmuls); on the meta device
SDPA is routed to that kernel's CPU twin, whose FLOP formula torch does not register (we do), so the
count is the same on meta, CPU and CUDA. Model FLOPs are counted without activation checkpointing: a
re-computed forward is hardware work, not model work (MFU, not HFU). Only matmuls and convolutions
count (norms, GELU, softmax are well under 1 % of a ViT's FLOPs and torch has no formula for them).

MFU = achieved model FLOP/s per rank / the device's peak: a datasheet table by device name (dense, no
sparsity) in the training precision, ``run.peak_tflops`` to override it, and on CPU a matmul probe.
"""
from __future__ import annotations

import copy
import itertools
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
# torch registers the GPU SDPA kernels' formulas (on shapes), not their CPU twin's (it counts 0 for it)
_CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
             aten._scaled_dot_product_flash_attention_for_cpu_backward:
             lambda grad, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(grad, q, k, v)}


# ---------------------------------------------------------------- devices


@dataclass(frozen=True)
class Gpu:
    """A GPU model: datasheet peaks (dense TFLOP/s, no sparsity) and the memory nvidia-smi reports."""
    key: str             # as launch/estimate.py --gpu names it
    pattern: str         # regex on torch.cuda.get_device_name(), lower case
    memory_mib: int
    bf16: float
    tf32: float
    fp32: float

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 2**20


# NVIDIA datasheets (A100: 40/80 GB SXM and PCIe share the peaks; H100 SXM5; H100 PCIe; H100 NVL; H200 SXM;
# H200 NVL; L40S; L4). Order matters: the first pattern that matches the device name wins.
GPUS = [
    Gpu("h100-pcie", r"h100.*pcie", 81559, 756.0, 378.0, 51.2),
    Gpu("h100-nvl", r"h100.*nvl", 95830, 835.0, 417.5, 60.0),
    Gpu("h100-80gb", r"h100", 81559, 989.4, 494.7, 66.9),
    Gpu("h200-nvl", r"h200.*nvl", 143771, 835.0, 417.5, 60.0),
    Gpu("h200", r"h200", 143771, 989.4, 494.7, 66.9),
    Gpu("a100-40gb", r"a100.*40\s*gb", 40960, 312.0, 156.0, 19.5),
    Gpu("a100-80gb", r"a100", 81920, 312.0, 156.0, 19.5),
    Gpu("l40s", r"l40s", 46068, 362.05, 183.0, 91.6),
    Gpu("l4", r"\bl4\b", 23034, 121.0, 60.0, 30.3),
]


def gpu(key: str) -> Gpu:
    from .errors import UserError
    for g in GPUS:
        if g.key == key.lower():
            return g
    raise UserError(f"unknown GPU {key!r}; known: {', '.join(g.key for g in GPUS)}")


def gpu_by_name(name: str) -> Gpu | None:
    return next((g for g in GPUS if re.search(g.pattern, name.lower())), None)


def matmul_precision(precision: str) -> str:
    """'bf16', 'tf32' (fp32 training with TF32 matmuls allowed) or 'fp32'."""
    if precision == "bf16":
        return "bf16"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


@dataclass(frozen=True)
class Peak:
    tflops: float | None  # None: unknown (no MFU)
    source: str


_PROBED: dict[tuple, float] = {}


def cpu_probe_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.25) -> float:
    """Best matmul TFLOP/s of this CPU in ``dtype`` (measured once per process and thread count: it is this machine's
    practical peak, as loaded as it is, not a datasheet value)."""
    key = (dtype, n, torch.get_num_threads())
    if key not in _PROBED:
        g = torch.Generator().manual_seed(0)  # its own generator: the process RNG is not touched
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        a @ b
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds or best == float("inf"):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _PROBED[key] = 2 * n**3 / best / 1e12
    return _PROBED[key]


def peak(device: torch.device, precision: str, override: float = 0.0) -> Peak:
    """The peak MFU is measured against: ``override`` (run.peak_tflops), the table, or the CPU probe."""
    if override:
        return Peak(override, "run.peak_tflops")
    kind = matmul_precision(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        g = gpu_by_name(name)
        if g is None:
            return Peak(None, f"{name} is not in modasm.perf.GPUS: set run.peak_tflops")
        return Peak(getattr(g, kind), f"datasheet {g.key} {kind} (device: {name})")
    if device.type == "cpu":
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        threads = torch.get_num_threads()
        return Peak(cpu_probe_tflops(dtype), f"measured: CPU {kind} 1024^3 matmul probe ({threads} threads)")
    return Peak(None, f"no peak known for device {device}: set run.peak_tflops")


# ---------------------------------------------------------------- one step, traced on the meta device


def meta_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model with every parameter and buffer on the meta device (same requires_grad, same modes).

    No tensor data is copied: the memo maps each tensor to its meta twin before deepcopy reaches it.
    """
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        m = torch.empty_like(t, device="meta", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        memo[id(t)] = torch.nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else m
    return copy.deepcopy(model, memo)


class _FusedAttention(TorchFunctionMode):
    """SDPA as the fused kernel (its CPU twin, which has a meta kernel): what it saves and what it costs
    are a GPU's flash attention's, not those of the math decomposition the meta device would pick."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            a = {**dict(zip(names, args)), **kwargs}
            if not a.get("enable_gqa"):
                return aten._scaled_dot_product_flash_attention_for_cpu(
                    a["query"], a["key"], a["value"], a.get("dropout_p", 0.0), a.get("is_causal", False),
                    attn_mask=a.get("attn_mask"), scale=a.get("scale"))[0]
        return func(*args, **kwargs)


@dataclass
class StepTrace:
    """One training step of a micro-batch of ``batch`` images, as counted on the meta device."""
    batch: int
    forward_flops: int              # of the micro-batch
    train_flops: int                # forward + backward
    saved: dict = field(default_factory=dict)         # bytes kept for backward: 'blocks.i' -> bytes, 'other'
    block_inputs: dict = field(default_factory=dict)  # bytes of each block's input (what checkpointing keeps)
    dtype: torch.dtype = torch.float32

    @property
    def flops_per_image(self) -> float:
        return self.train_flops / self.batch

    @property
    def forward_flops_per_image(self) -> float:
        return self.forward_flops / self.batch

    def activation_bytes_per_image(self, checkpointing: bool) -> float:
        """Activations held at the backward's peak, per image: what autograd saved, plus the transient of
        one block's backward (its activation gradients, of the size of what it saved). With checkpointing
        a block that has a backward keeps only its input, and one block at a time is re-computed."""
        blocks = {b: s for b, s in self.saved.items() if b != "other" and s}
        largest = max(blocks.values(), default=0)
        other = self.saved.get("other", 0)
        if not checkpointing:
            return (other + sum(blocks.values()) + largest) / self.batch
        return (other + sum(self.block_inputs[b] for b in blocks) + 2 * largest) / self.batch


def _image_input(model: torch.nn.Module, batch: int, dtype: torch.dtype) -> torch.Tensor:
    pe = model.patch_embed  # timm's PatchEmbed knows the input the model expects
    return torch.zeros(batch, pe.proj.in_channels, *pe.img_size, device="meta", dtype=dtype)


def trace_step(model: torch.nn.Module, batch: int = 2, dtype: torch.dtype | None = None,
               backward: bool = True) -> StepTrace:
    """Count one training step of ``model`` (a timm ViT) on a meta copy: FLOPs (forward, and forward +
    backward) and the bytes autograd saves for the backward, per block. ``dtype``: the training dtype
    (DeepSpeed's bf16 engines cast the module); the default keeps the model's."""
    dtype = dtype or next(model.parameters()).dtype
    m = meta_copy(model, dtype)
    params = {p.untyped_storage()._cdata for p in m.parameters()}
    where, seen, saved, inputs = ["other"], set(), {"other": 0}, {}
    hooks = []
    for i, blk in enumerate(getattr(m, "blocks", [])):
        def pre(mod, args, name=f"blocks.{i}"):
            where[0] = name
            saved.setdefault(name, 0)
            inputs[name] = args[0].untyped_storage().nbytes()

        hooks += [blk.register_forward_pre_hook(pre),
                  blk.register_forward_hook(lambda *_: where.__setitem__(0, "other"))]

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s._cdata not in params and s._cdata not in seen:  # weights are not activations; views count once
            seen.add(s._cdata)
            saved[where[0]] += s.nbytes()
        return t

    try:
        with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter, _FusedAttention(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = m(_image_input(m, batch, dtype))
            loss = F.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long, device="meta"))
            forward = counter.get_total_flops()
            if backward and loss.requires_grad:
                loss.backward()
            total = counter.get_total_flops()
    finally:
        for h in hooks:
            h.remove()
    return StepTrace(batch, forward, total, saved, inputs, dtype)


# ---------------------------------------------------------------- a phase's meter


@dataclass(frozen=True)
class Meter:
    """Model FLOPs per trained image of a phase and the peak its MFU is measured against."""
    flops_per_image: float
    peak: Peak

    @classmethod
    def for_model(cls, model: torch.nn.Module, device: torch.device, precision: str,
                  peak_override: float = 0.0) -> "Meter":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return cls(trace_step(model, dtype=dtype).flops_per_image, peak(device, precision, peak_override))

    def tflops(self, img_per_s_per_rank: float) -> float:
        return self.flops_per_image * img_per_s_per_rank / 1e12

    def fields(self, img_per_s_per_rank: float) -> dict:
        """``tflops`` (achieved model TFLOP/s per rank) and ``mfu`` (a fraction of the peak; None if unknown)."""
        tf = self.tflops(img_per_s_per_rank)
        return {"tflops": tf, "mfu": tf / self.peak.tflops if self.peak.tflops else None}
