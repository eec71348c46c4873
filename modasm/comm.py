"""What a training step sends between data-parallel ranks, how long that takes, and how much of it the step waits for.

A model (no GPU involved), of DeepSpeed 0.19.8 as ``modasm.engine`` configures it. Per optimizer step of a
data-parallel group of n ranks, with Ψ trainable parameters (the frozen meta modules of a hybrid are never
reduced), T parameters in all, b_c bytes per element of the communication dtype and b_p of the weights:

- ZeRO-0: the engine all-reduces the gradients at the accumulation boundary, after the backward
  (``allreduce_gradients`` -> ``buffered_allreduce_fallback``): b_c·Ψ, all-reduce, exposed.
- ZeRO-1, bf16 with fp32 accumulation: ``BF16_Optimizer``. After the boundary's backward the engine all-reduces its
  fp32 gradient buffer in ``communication_data_type`` (``get_grads_for_reduction``, buckets of 5e8 elements): b_c·Ψ,
  all-reduce, exposed (nothing of it runs during the backward); after the step ``update_lp_params`` all-gathers
  the updated 16-bit weights: b_p·Ψ, all-gather, exposed. ZeRO-1 otherwise (fp32): the ZeRO optimizer's
  ``reduce_gradients`` at the boundary moves the same bytes (modasm.engine leaves ``overlap_comm`` off below ZeRO-2).
- ZeRO-2: at *every* micro-step, gradients go into buckets of ``reduce_bucket_size`` elements, each all-reduced when
  full (0.19.8's ``reduce_scatter=true`` with its default ``use_multi_rank_bucket_allreduce=true`` is an all-reduce
  per bucket, of which each rank keeps its partition: an all-reduce's bytes, not a reduce-scatter's); with
  ``overlap_comm`` on a side stream while the backward goes on. After the step: the all-gather of the weights.
- ZeRO-3: at every micro-step the weights are all-gathered for the forward and again for the backward (b_p·T each;
  frozen weights are partitioned too) and the gradients reduce-scattered (``reduce_scatter_coalesced``, b_c·Ψ): the
  ZeRO paper's 3Ψ against data parallelism's 2Ψ. With ``overlap_comm`` the gathers are prefetched.

Time of a collective of an array of S bytes over n ranks (ring; nccl-tests' doc/PERFORMANCE.md, whose *bus
bandwidth* B is defined so that it does not depend on n): all-reduce 2(n-1)/n·S/B, reduce-scatter and all-gather
(n-1)/n·S/B. B: within a node, the achievable NVLink (or PCIe) bus bandwidth; over several nodes
min(that, GPUs per node x the network's achievable bandwidth per GPU), since a ring enters and leaves each node
once per channel, and NCCL spreads its channels over the node's NICs (one per GPU on DGX/HGX nodes). Message-size
and latency effects are left out (the buckets here are 10^8 - 10^9 bytes, where nccl-tests' bus bandwidth has
levelled off).

What the step waits for ("exposed"): everything that runs after the backward or after the optimizer step; of a
ZeRO-2/3 reduction with ``overlap_comm``, what is left after the backward ends, on one stream that takes bucket i
once the backward has produced it (gradients appear in proportion to parameters over the part of the backward that
produces them), so at least the last bucket's reduction; ZeRO-3's forward gathers beyond the forward's duration.
Not counted: ZeRO-3's costs beyond bandwidth (a hook and a gather per layer, their launches and allocations), the
optimizer step itself (in the compute's MFU), latency, NVLink SHARP, and compute slowed by concurrent NCCL kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DS_BUCKET = 500_000_000   # DeepSpeed's default reduce_bucket_size (elements)
# A bucket the reduction can start on long before the backward ends, yet one NCCL moves at its peak rate: 1e8
# elements is 400 MB in fp32 (200 MB in bf16); NCCL's maintainers: 256 MB is already short of the peak bus
# bandwidth on 8 H100s (nccl-tests issue 212), so smaller buckets would lose bandwidth this model does not see.
OVERLAP_BUCKET = 100_000_000
BYTES = {"fp32": 4, "bf16": 2}


# ---------------------------------------------------------------- links


@dataclass(frozen=True)
class Links:
    """A GPU model's links: line rates per GPU and per direction, the fraction NCCL achieves as bus bandwidth
    (nccl-tests' busbw of large all-reduce / all-gather), GPUs per node, and where the figures come from."""
    intra_gbs: float        # GB/s: NVLink (or PCIe) line rate per GPU, one direction
    intra_eff: float        # achievable bus bandwidth / line rate
    net_gbps: float         # Gb/s: network line rate per GPU (the node's NICs / its GPUs)
    net_eff: float
    gpus_per_node: int
    source: str

    @property
    def intra_busbw(self) -> float:
        return self.intra_gbs * self.intra_eff

    def inter_busbw(self, net_gbps: float | None = None) -> float:
        """A ring over several nodes: the lower of NVLink's and the node's NICs' bus bandwidth (GB/s)."""
        net = (self.net_gbps if net_gbps is None else net_gbps) / 8 * self.net_eff * self.gpus_per_node
        return min(self.intra_busbw, net)


_DGX_H = ("NVLink 4 (18 links) 450 GB/s per direction, NCCL achieves ~370 (ring; NVLink SHARP all-reduce ~480 "
          "is not counted: nccl-tests #212); network one 400 Gb/s NDR NIC per GPU (DGX/HGX H100, H200), NCCL "
          "achieves 46-48 GB/s per NIC (nccl-tests #290)")
_DGX_A = ("NVLink 3 (12 links) 300 GB/s per direction, NCCL achieves ~230 (nccl-tests #149, #175); network one "
          "200 Gb/s HDR NIC per GPU (DGX A100), NCCL achieves 24 GB/s per NIC (nccl-tests #160)")
_PCIE = ("PCIe across 8 GPUs: NCCL is bound by the host (NVIDIA, nccl #1639: 8 PCIe Gen5 GPUs reached 28 GB/s, "
         "0.44 of 64 GB/s); network assumed 100 Gb/s per GPU (no reference system: set --inter-node-gbps)")
LINKS = {
    "h100-80gb": Links(450.0, 0.82, 400.0, 0.94, 8, _DGX_H),
    "h200": Links(450.0, 0.82, 400.0, 0.94, 8, _DGX_H),
    "a100-80gb": Links(300.0, 0.77, 200.0, 0.96, 8, _DGX_A),
    "a100-40gb": Links(300.0, 0.77, 200.0, 0.96, 8, _DGX_A),
    # NVLink bridges join only pairs (H100 NVL, H200 NVL: up to 4); a group of 8 all-reduces over PCIe Gen5
    "h100-pcie": Links(64.0, 0.44, 100.0, 0.94, 8, "PCIe Gen5 x16 64 GB/s; " + _PCIE),
    "h100-nvl": Links(64.0, 0.44, 100.0, 0.94, 8, "PCIe Gen5 x16 64 GB/s; " + _PCIE),
    "h200-nvl": Links(64.0, 0.44, 100.0, 0.94, 8, "PCIe Gen5 x16 64 GB/s; " + _PCIE),
    "l40s": Links(32.0, 0.44, 100.0, 0.94, 8, "PCIe Gen4 x16 32 GB/s; " + _PCIE),
    "l4": Links(32.0, 0.44, 100.0, 0.94, 8, "PCIe Gen4 x16 32 GB/s; " + _PCIE),
}


@dataclass(frozen=True)
class Network:
    """The bus bandwidths a plan runs at (GB/s): within a node, and of a ring over several."""
    intra: float
    inter: float
    gpus_per_node: int
    how: str

    def busbw(self, ranks: int) -> float:
        return self.intra if ranks <= self.gpus_per_node else self.inter

    def nodes(self, ranks: int) -> int:
        return math.ceil(ranks / self.gpus_per_node)


def network(gpu_key: str, net_gbps: float | None = None, gpus_per_node: int | None = None,
            measured: dict | None = None) -> Network:
    """The defaults of ``gpu_key``, the network line rate per GPU and GPUs per node if given, and bus bandwidths
    measured (``{"intra": GB/s, "inter": GB/s}``, either optional) over all of them."""
    ln = LINKS[gpu_key]
    if gpus_per_node:
        ln = Links(ln.intra_gbs, ln.intra_eff, ln.net_gbps, ln.net_eff, gpus_per_node, ln.source)
    net = ln.net_gbps if net_gbps is None else net_gbps
    how = (f"intra-node {ln.intra_gbs:g} GB/s x {ln.intra_eff:g} achievable = {ln.intra_busbw:.0f} GB/s bus bandwidth; "
           f"inter-node {net:g} Gb/s per GPU x {ln.net_eff:g} x {ln.gpus_per_node} GPUs per node = "
           f"{net / 8 * ln.net_eff * ln.gpus_per_node:.0f} GB/s, a ring over nodes runs at the lower: "
           f"{ln.inter_busbw(net):.0f} GB/s")
    intra, inter = ln.intra_busbw, ln.inter_busbw(net)
    measured = measured or {}
    if measured.get("intra"):
        intra = float(measured["intra"])
        how += f"; measured intra-node {intra:g} GB/s"
    if measured.get("inter"):
        inter = float(measured["inter"])
        how += f"; measured inter-node {inter:g} GB/s"
    elif measured.get("intra"):
        inter = min(inter, intra)
    return Network(intra, inter, ln.gpus_per_node, how)


# ---------------------------------------------------------------- what a step sends


@dataclass(frozen=True)
class Setting:
    """The deepspeed keys that decide the traffic. ``overlap`` counts from ZeRO-2 on (modasm.engine)."""
    stage: int
    precision: str = "bf16"
    communication_dtype: str = "fp32"
    overlap: bool = False
    bucket: int = DS_BUCKET

    @property
    def overlaps(self) -> bool:
        return self.overlap and self.stage >= 2

    def label(self) -> str:
        comm = self.communication_dtype if self.precision == "bf16" else "fp32"
        ov = ("overlap, bucket %.0e" % self.bucket).replace("e+0", "e") if self.overlaps else "no overlap"
        return f"ZeRO-{self.stage} {comm} comm, {ov}"


@dataclass(frozen=True)
class Collective:
    what: str       # 'gradients' | 'weights'
    kind: str       # 'all_reduce' | 'reduce_scatter' | 'all_gather'
    size: int       # bytes of the whole array
    per_step: int   # times per optimizer step
    when: str       # 'forward' | 'backward' (overlappable) | 'after backward' | 'after step'

    def factor(self, n: int) -> float:
        """Bytes each rank sends per byte of the array (ring; nccl-tests' bus bandwidth factors)."""
        return (2 if self.kind == "all_reduce" else 1) * (n - 1) / n

    def seconds(self, n: int, busbw_gbs: float, size: int | None = None) -> float:
        return self.factor(n) * (self.size if size is None else size) / (busbw_gbs * 1e9)


def collectives(s: Setting, trainable: int, total: int, accum: int) -> list[Collective]:
    bc = BYTES[s.communication_dtype if s.precision == "bf16" else "fp32"]
    bp = BYTES[s.precision]
    if s.stage == 0:
        return [Collective("gradients", "all_reduce", bc * trainable, 1, "after backward")]
    if s.stage == 1:
        return [Collective("gradients", "all_reduce", bc * trainable, 1, "after backward"),
                Collective("weights", "all_gather", bp * trainable, 1, "after step")]
    if s.stage == 2:
        return [Collective("gradients", "all_reduce", bc * trainable, accum, "backward"),
                Collective("weights", "all_gather", bp * trainable, 1, "after step")]
    return [Collective("weights", "all_gather", bp * total, accum, "forward"),
            Collective("weights", "all_gather", bp * total, accum, "backward"),
            Collective("gradients", "reduce_scatter", bc * trainable, accum, "backward")]


def buckets(elements: int, bucket: int) -> list[int]:
    full, rest = divmod(elements, bucket)
    return [bucket] * full + ([rest] if rest else [])


def stream_finish(items: list[tuple[float, float]]) -> float:
    """One communication stream: each (ready time, duration) starts once ready and once the previous is done."""
    t = 0.0
    for ready, duration in items:
        t = max(t, ready) + duration
    return t


@dataclass(frozen=True)
class StepTime:
    compute: float     # s per optimizer step (all micro-steps)
    comm: float        # s of communication per optimizer step, nothing overlapped
    exposed: float     # s of it the step waits for
    volume: float      # bytes each rank sends per optimizer step

    @property
    def total(self) -> float:
        return self.compute + self.exposed


def step_time(s: Setting, trainable: int, total: int, ranks: int, accum: int, compute: float,
              forward_fraction: float, busbw_gbs: float, grad_window: float = 1.0) -> StepTime:
    """``compute``: seconds of one optimizer step without communication (``accum`` micro-steps);
    ``forward_fraction``: the forward's share of a micro-step's compute (from counted FLOPs); ``grad_window``: the
    last fraction of the backward in which the trainable parameters' gradients appear (1: all of it, as in a model
    that trains every block; a hybrid's backward first runs through the frozen modules after the trained one)."""
    cs = collectives(s, trainable, total, accum)
    if ranks == 1:
        return StepTime(compute, 0.0, 0.0, 0.0)
    n, bw = ranks, busbw_gbs
    comm = sum(c.per_step * c.seconds(n, bw) for c in cs)
    volume = sum(c.per_step * c.factor(n) * c.size for c in cs)
    if not s.overlaps:
        return StepTime(compute, comm, comm, volume)
    t_fwd = compute / accum * forward_fraction
    t_bwd = compute / accum - t_fwd
    exposed = sum(c.per_step * c.seconds(n, bw) for c in cs if c.when in ("after backward", "after step"))
    fwd = [c for c in cs if c.when == "forward"]
    exposed += accum * max(0.0, sum(c.seconds(n, bw) for c in fwd) - t_fwd)
    # the backward: ZeRO-3's weight gathers first (prefetched), then the gradient buckets as they fill
    items = [(0.0, c.seconds(n, bw)) for c in cs if c.when == "backward" and c.what == "weights"]
    grads = next(c for c in cs if c.when == "backward" and c.what == "gradients")
    done, start = 0, t_bwd * (1 - grad_window)
    for b in buckets(trainable, s.bucket):
        done += b
        ready = start + t_bwd * grad_window * done / trainable
        items.append((ready, grads.seconds(n, bw, grads.size * b // trainable)))
    exposed += accum * max(0.0, stream_finish(items) - t_bwd)
    return StepTime(compute, comm, exposed, volume)
