"""Before a long run: memory per rank, the micro-batch that fits, and what the whole pipeline will cost.

For every phase of a recipe on ``gpus`` x ``gpu``:
- model states per rank (parameters, gradients, optimizer) for the recipe's ZeRO stage and precision:
  DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``, which stages 1 and 2 share, and
  ``estimate_zero3_model_states_mem_needs``) for the trainable parameters, plus what they leave out: the
  frozen parameters of a hybrid, and the full 16-bit gradients stage 1 keeps. Stage 0 and fp32 have no
  DeepSpeed estimator; they are counted by hand (the components are printed either way);
- activations per image, traced on the meta device (``perf.trace_step``: what autograd saves for the
  backward, plus one block's backward transient), with and without activation checkpointing;
- the largest micro-batch that fits in 90 % of the device (the rest: CUDA context, DeepSpeed's
  communication buckets, allocator fragmentation; ``benchmarks/gpu_check.sh`` measures the real peak);
- each phase's step time: compute (training FLOPs per step / (peak x MFU), the MFU assumed, and saying so, or
  measured by ``launch/bench.py``) + the communication the step waits for (``modasm.comm``: bytes per step by
  ZeRO stage and dtype, ring volumes, the bus bandwidth within and across nodes, what ``overlap_comm`` hides);
  the projected MFU (model FLOPs / (step time x peak));
- device-hours per phase and for the pipeline: training FLOPs per image (counted, ``perf``) x images
  (+ the evaluations' forward passes) / (peak x MFU), stretched by step time / compute time.

``recommend`` turns the memory plan and the step-time model into the recipe's settings (``<phase>.micro_batch``,
``deepspeed.zero_stage``, ``deepspeed.communication_dtype``, ``deepspeed.overlap_comm``,
``deepspeed.reduce_bucket_size``, ``speed.checkpointing``); the shipped ImageNet recipes carry its answer for the
hardware their header names (tests/test_estimate.py).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import comm, engine, perf, phases
from .config import Recipe
from .errors import UserError

CAPACITY = 0.9            # of the device's memory a plan may fill
MIN_MICRO = 32            # below this a GPU idles between kernels; checkpointing is worth its re-computation
# A setting that projects the pipeline at most this much slower than the fastest one is as good as it: then fp32
# communication (24 mantissa bits in the sums), the lower ZeRO stage and no overlap win (the model's error is larger)
TOLERANCE = 0.02
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
GiB = 2**30
# The paper's training cost of ViT-H/14 as the issue quotes it (A100-hours; its code: fp32, ~22 img/s per A100)
PAPER = {"ViT-H/14": {"assembled": 2720.0, "e2e": 4790.0, "gpu": "a100-80gb"}}


def model_name(recipe: Recipe) -> str:
    m = recipe.model
    size = {768: "B", 1024: "L", 1280: "H"}.get(m.embed_dim, f"{m.embed_dim}w")
    return f"ViT-{size}/{m.patch_size}"


def sized_for(recipe_path: str | Path) -> tuple[int, str] | None:
    """(GPUs, GPU key) from a recipe header line ``# Sized for: 32 x A100-80GB ...``."""
    m = re.search(r"^#\s*Sized for:\s*(\d+)\s*x\s*([A-Za-z0-9-]+)", Path(recipe_path).read_text(), re.M)
    return (int(m.group(1)), m.group(2).lower()) if m else None


# ---------------------------------------------------------------- model states


@dataclass(frozen=True)
class States:
    """Bytes per rank of parameters, gradients and optimizer states, and where the figure comes from."""
    params: int
    grads: int
    optimizer: int
    how: str

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_states(total: int, trainable: int, largest: int, stage: int, precision: str, ranks: int) -> States:
    """Per rank, for ``total`` parameters of which ``trainable`` train (AdamW), on ``ranks`` data-parallel
    ranks. bf16: DeepSpeed keeps 16-bit weights and fp32 master weights, gradients and Adam moments."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    T, t, f, N = total, trainable, total - trainable, ranks
    if precision == "bf16":
        if stage == 0:  # DeepSpeed's BF16_Optimizer: full fp32 gradient buffer, master + moments partitioned
            return States(2 * T, 2 * t + 4 * t, 12 * t // N, "hand count (DeepSpeed BF16_Optimizer, no estimator)")
        if stage in (1, 2):
            ds = estimate_zero2_model_states_mem_needs(t, num_gpus_per_node=N, cpu_offload=False)[1]
            # stage 1 keeps every gradient, in the accumulation dtype: fp32 (deepspeed.grad_accum_dtype, our default)
            full_grads = 4 * t - 2 * t // N if stage == 1 else 0
            s = States(2 * T, 2 * t // N + 4 * t // N + full_grads, 12 * t // N,
                       f"DeepSpeed estimate_zero2 ({ds / GiB:.2f} GiB) + frozen weights"
                       + (" + stage 1's full fp32-accumulated gradients" if stage == 1 else ""))
            assert abs(s.total - (ds + 2 * f + full_grads)) <= 8, (s, ds)  # our split adds up to DeepSpeed's total
            return s
        ds = estimate_zero3_model_states_mem_needs(t, largest, num_gpus_per_node=N, cpu_offload=False,
                                                   cpu_offload_params=False)[1]
        s = States(2 * T // N + 4 * largest, 4 * t // N, 12 * t // N,
                   f"DeepSpeed estimate_zero3 ({ds / GiB:.2f} GiB) + frozen weights")
        assert abs(s.total - (ds + 2 * f // N)) <= 8, (s, ds)
        return s
    how = "hand count (fp32: DeepSpeed's estimators assume 16-bit weights)"
    if stage == 0:
        return States(4 * T, 4 * t, 8 * t, how)
    if stage == 1:
        return States(4 * T, 4 * t, 12 * t // N, how)
    if stage == 2:
        return States(4 * T, 4 * t // N, 12 * t // N, how)
    return States(4 * T // N + 4 * largest, 4 * t // N, 12 * t // N, how)


# ---------------------------------------------------------------- the phases of a recipe


@dataclass
class PhaseModel:
    label: str          # meta, incubate[k], assemble, e2e
    section: str
    k: int | None
    ranks: int          # data-parallel ranks it trains on
    share: int          # images per rank per optimizer step
    params: int
    trainable: int
    largest: int        # parameters of the largest layer (ZeRO-3 gathers one at a time)
    trace: perf.StepTrace

    def states(self, stage: int, precision: str) -> States:
        return model_states(self.params, self.trainable, self.largest, stage, precision, self.ranks)

    def act(self, micro: int, checkpointing: bool) -> float:
        return micro * self.trace.activation_bytes_per_image(checkpointing)


def sections(recipe: Recipe) -> list[str]:
    """The phases a recipe runs: all four, or only the fine-tunes that start from another run's target."""
    if recipe.assemble.init_from:
        return ["assemble"] + (["e2e"] if recipe.e2e.init_from else [])
    return ["meta", "incubate", "assemble", "e2e"]


def nodes(gpus: int, gpus_per_node: int) -> int:
    """Nodes of ``gpus_per_node`` that ``gpus`` fill (fewer GPUs than a node holds: one node)."""
    if gpus > gpus_per_node and gpus % gpus_per_node:
        raise UserError(f"{gpus} GPUs do not fill nodes of {gpus_per_node} (--gpus-per-node): torchrun starts the "
                        "same number of ranks on every node")
    return max(1, gpus // gpus_per_node)


def incubation_groups(recipe: Recipe, gpus: int, gpus_per_node: int = 8) -> int:
    """The farm's module groups on ``gpus`` in nodes of ``gpus_per_node``: as slurm/incubate.sh runs it, one torchrun
    per node, so the groups split over the nodes (``phases.farm_groups``, what the farm itself counts)."""
    return phases.farm_groups(recipe, gpus, nodes(gpus, gpus_per_node))


def phase_model(recipe: Recipe, section: str, k: int | None, ranks: int) -> PhaseModel:
    spec, cfg = phases.PHASES[section], getattr(recipe, section)
    if cfg.batch_size % ranks:
        raise UserError(f"{section}.batch_size={cfg.batch_size} does not split over {ranks} ranks")
    with torch.device("meta"):
        model = spec.build(recipe, k, None)
    dtype = torch.bfloat16 if recipe.deepspeed.precision == "bf16" else torch.float32
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return PhaseModel(phases.label(section, k), section, k, ranks, cfg.batch_size // ranks,
                      sum(p.numel() for p in model.parameters()),
                      sum(p.numel() for p in model.parameters() if p.requires_grad), largest,
                      perf.trace_step(model, dtype=dtype))


def phase_models(recipe: Recipe, gpus: int, gpus_per_node: int = 8) -> list[PhaseModel]:
    out = []
    for section in sections(recipe):
        if section == "incubate":
            ranks = gpus // incubation_groups(recipe, gpus, gpus_per_node)
            out += [phase_model(recipe, section, k, ranks) for k in range(recipe.model.K)]
        else:
            out.append(phase_model(recipe, section, None, gpus))
    return out


# ---------------------------------------------------------------- what fits, and the recommendation


def largest_micro(pm: PhaseModel, stage: int, precision: str, checkpointing: bool, memory: int) -> int:
    room = CAPACITY * memory - pm.states(stage, precision).total
    return max(0, int(room // pm.trace.activation_bytes_per_image(checkpointing)))


def pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def micro_for(pm: PhaseModel, stage: int, precision: str, checkpointing: bool, memory: int) -> int:
    """The per-rank share if it fits (no accumulation), else the largest power of two that does (0: none)."""
    fit = largest_micro(pm, stage, precision, checkpointing, memory)
    return pm.share if fit >= pm.share else pow2_floor(fit)


@dataclass
class Recommendation:
    zero_stage: int
    checkpointing: bool
    micro: dict          # section -> micro_batch (incubation: the smallest over its modules)
    communication_dtype: str = "fp32"
    overlap_comm: bool = False                 # from ZeRO-2 on
    reduce_bucket_size: int | None = None      # with overlap_comm; None: DeepSpeed's default
    candidates: list = field(default_factory=list, compare=False, repr=False)  # the settings weighed (Candidate)

    def overrides(self) -> list[str]:
        ds = [f"deepspeed.zero_stage={self.zero_stage}", f"deepspeed.communication_dtype={self.communication_dtype}"]
        if self.zero_stage >= 2:
            ds += [f"deepspeed.overlap_comm={str(self.overlap_comm).lower()}",
                   f"deepspeed.reduce_bucket_size={self.reduce_bucket_size or 'null'}"]
        return (ds + [f"speed.checkpointing={str(self.checkpointing).lower()}"]
                + [f"{s}.micro_batch={m}" for s, m in self.micro.items()])


@dataclass(frozen=True)
class Candidate:
    setting: comm.Setting
    micro: dict          # section -> micro_batch
    hours: float         # projected device-hours of every phase the recipe runs (E2E included)


def recipe_setting(ds) -> comm.Setting:
    """The traffic-deciding keys of a recipe's deepspeed section (overlap_comm null: on from ZeRO-2)."""
    return comm.Setting(ds.zero_stage, ds.precision, ds.communication_dtype,
                        ds.zero_stage >= 2 and ds.overlap_comm is not False, ds.reduce_bucket_size or comm.DS_BUCKET)


def settings(stage: int, precision: str) -> list[comm.Setting]:
    dtypes = ("fp32", "bf16") if precision == "bf16" else ("fp32",)
    overlaps = (False, True) if stage >= 2 else (False,)
    return [comm.Setting(stage, precision, d, o, comm.OVERLAP_BUCKET if o else comm.DS_BUCKET)
            for d in dtypes for o in overlaps]


def recommend(models: list[PhaseModel], precision: str, memory: int, timing: "Timing") -> Recommendation:
    """Checkpointing only when without it some phase would run micro-batches under ``MIN_MICRO`` (below its
    share): re-computing the forward costs ~1/3 more FLOPs, accumulating costs next to nothing. Then every ZeRO
    stage from 1 (from 0 when every phase runs on one rank) at which no phase gets a smaller micro-batch than at
    stage 3 (a smaller one would cost compute efficiency the model does not know), with each communication dtype
    and, from ZeRO-2, with and without ``overlap_comm`` (at ``comm.OVERLAP_BUCKET``), is projected over every
    phase (device-hours, each step = compute + the communication it waits for: ``modasm.comm``). ZeRO-3 only when
    no lower stage qualifies: its per-layer gathers cost more than their bytes (``modasm.comm`` counts bytes), and
    it is weighed (printed) otherwise but not chosen. The fastest wins; within ``TOLERANCE`` of it, fp32
    communication, then the lower stage, then no overlap."""
    def micros(stage, ckpt):
        out = {}
        for pm in models:
            m = micro_for(pm, stage, precision, ckpt, memory)
            out[pm.section] = min(out.get(pm.section, m), m)
        return out

    ckpt = any(micro_for(pm, 3, precision, False, memory) < min(pm.share, MIN_MICRO) for pm in models)
    best = micros(3, ckpt)
    if min(best.values()) < 1:
        raise UserError("not even one image per micro-batch fits at ZeRO-3 with activation checkpointing: "
                        "use more GPUs, or GPUs with more memory")
    # one rank: nothing to partition; but bf16 accumulates gradients in fp32 only through ZeRO (>= 1)
    first = 0 if all(pm.ranks == 1 for pm in models) and precision != "bf16" else 1
    cands = []
    for stage in range(first, 4):
        got = micros(stage, ckpt)
        if all(got[s] >= best[s] for s in best):
            cands += [Candidate(st, got, timing.hours(models, st, got)) for st in settings(stage, precision)]
    eligible = [c for c in cands if c.setting.stage < 3] or cands
    fastest = min(c.hours for c in eligible)
    pick = min((c for c in eligible if c.hours <= fastest * (1 + TOLERANCE)),
               key=lambda c: (c.setting.communication_dtype != "fp32", c.setting.stage, c.setting.overlap))
    st = pick.setting
    return Recommendation(st.stage, ckpt, pick.micro, st.communication_dtype, st.overlaps,
                          st.bucket if st.overlaps else None, cands)


# ---------------------------------------------------------------- step time and cost


@dataclass
class Cost:
    label: str
    flops_per_image: float   # training step
    images: int
    eval_flops: float
    device_hours: float

    @property
    def flops(self) -> float:
        return self.flops_per_image * self.images + self.eval_flops


def cost(recipe: Recipe, pm: PhaseModel, peak_tflops: float, mfu: float, n_train: int, n_val: int,
         stretch: float = 1.0) -> Cost:
    """``stretch``: step time / compute time (the communication the step waits for; evaluations have none)."""
    cfg = getattr(recipe, pm.section)
    evals = cfg.epochs // cfg.eval_every_epochs + (1 if cfg.epochs % cfg.eval_every_epochs else 0)
    images = cfg.epochs * int(n_train * recipe.data.fraction)
    eval_flops = evals * n_val * pm.trace.forward_flops_per_image
    train = pm.trace.flops_per_image * images
    return Cost(pm.label, pm.trace.flops_per_image, images, eval_flops,
                (train * stretch + eval_flops) / (peak_tflops * 1e12 * mfu) / 3600)


@dataclass
class Timing:
    """What a phase's step time needs besides its model: the recipe (batch plan, epochs), the device's peak
    (TFLOP/s), the compute efficiency (MFU without communication: ``mfu`` assumed, or measured per phase by
    ``launch/bench.py``: ``measured``, {(section, k): mfu}) and the network (``comm.network``)."""
    recipe: Recipe
    peak: float
    network: comm.Network
    mfu: float = 0.4
    measured: dict = field(default_factory=dict)
    n_train: int = IMAGENET_TRAIN
    n_val: int = IMAGENET_VAL

    def mfu_of(self, pm: PhaseModel) -> float:
        inc = [v for (p, _), v in self.measured.items() if p == "incubate"]
        fallback = sum(inc) / len(inc) if pm.section == "incubate" and inc else self.mfu
        return self.measured.get((pm.section, pm.k), fallback)

    def accumulation(self, pm: PhaseModel, micro: int) -> tuple[int, int]:
        return engine.accumulation(dataclasses.replace(getattr(self.recipe, pm.section), micro_batch=micro),
                                   pm.ranks, pm.section)

    def grad_window(self, pm: PhaseModel) -> float:
        """The part of hybrid(k)'s backward in which module k's gradients appear: its d_k blocks (weight and input
        gradients: ~2 forwards each) after the K-1-k frozen meta blocks behind it (input gradients: ~1 forward)."""
        if pm.section != "incubate":
            return 1.0
        split = self.recipe.model.split
        return 2 * split[pm.k] / (2 * split[pm.k] + len(split) - 1 - pm.k)

    def step(self, pm: PhaseModel, setting: comm.Setting, micro: int, mfu: float | None = None) -> comm.StepTime:
        compute = pm.share * pm.trace.flops_per_image / (self.peak * 1e12 * (mfu or self.mfu_of(pm)))
        return comm.step_time(setting, pm.trainable, pm.params, pm.ranks, self.accumulation(pm, micro)[1], compute,
                              pm.trace.forward_flops / pm.trace.train_flops, self.network.busbw(pm.ranks),
                              self.grad_window(pm))

    def cost(self, pm: PhaseModel, setting: comm.Setting, micro: int, mfu: float | None = None) -> Cost:
        m = mfu or self.mfu_of(pm)
        st = self.step(pm, setting, micro, m)
        return cost(self.recipe, pm, self.peak, m, self.n_train, self.n_val, st.total / st.compute)

    def hours(self, models: list[PhaseModel], setting: comm.Setting, micro: dict, mfu: float | None = None) -> float:
        return sum(self.cost(pm, setting, micro[pm.section], mfu).device_hours for pm in models)


def timing_for(recipe: Recipe, gpu_key: str, mfu: float = 0.4, measured: str | None = None,
               inter_node_gbps: float | None = None, gpus_per_node: int | None = None,
               n_train: int = IMAGENET_TRAIN, n_val: int = IMAGENET_VAL) -> Timing:
    g = perf.gpu(gpu_key)
    net = comm.network(g.key, inter_node_gbps, gpus_per_node, measured_busbw(measured) if measured else None)
    return Timing(recipe, getattr(g, perf.matmul_precision(recipe.deepspeed.precision)), net, mfu,
                  measured_mfu(measured) if measured else {}, n_train, n_val)


def measured_mfu(path: str | Path) -> dict:
    """{(phase, k): mfu} from ``launch/bench.py --json`` results (the first measured row of each)."""
    out = {}
    for r in json.loads(Path(path).read_text())["results"]:
        if r.get("mfu") is not None:
            out.setdefault((r["phase"], r["k"]), r["mfu"])
    return out


def measured_busbw(path: str | Path) -> dict:
    """``{"intra": GB/s, "inter": GB/s}`` from a results file's optional top-level ``busbw_gbs`` (nccl-tests' bus
    bandwidth of a large all-reduce within a node and over nodes); {} when it has none."""
    return json.loads(Path(path).read_text()).get("busbw_gbs") or {}


# ---------------------------------------------------------------- the printed plan


def _gib(b: float) -> str:
    return f"{b / GiB:.1f}"


def report(recipe: Recipe, gpu_key: str, gpus: int, mfu: float = 0.4, measured: str | None = None,
           n_train: int = IMAGENET_TRAIN, n_val: int = IMAGENET_VAL, budget: float | None = None,
           inter_node_gbps: float | None = None, gpus_per_node: int | None = None) -> tuple[str, Recommendation]:
    g = perf.gpu(gpu_key)
    precision, stage, ckpt = recipe.deepspeed.precision, recipe.deepspeed.zero_stage, recipe.speed.checkpointing
    models = phase_models(recipe, gpus, gpus_per_node or 8)
    kind = perf.matmul_precision(precision)
    peak = getattr(g, kind)
    timing = timing_for(recipe, g.key, mfu, measured, inter_node_gbps, gpus_per_node, n_train, n_val)
    net = timing.network
    rec = recommend(models, precision, g.memory_bytes, timing)
    lines = [f"{model_name(recipe)} split {recipe.model.split} ({models[-1].params / 1e6:.3g} M parameters), "
             f"{precision}, "
             f"ZeRO-{stage}, checkpointing {'on' if ckpt else 'off'}; on {gpus} x {g.key} "
             f"({nodes(gpus, gpus_per_node)} node(s); incubation: {incubation_groups(recipe, gpus, gpus_per_node)} "
             "module group(s)) "
             f"({g.memory_mib / 1024:.0f} GiB, plan within {CAPACITY:.0%} = {_gib(CAPACITY * g.memory_bytes)} GiB; "
             f"peak {peak:g} {kind} TFLOP/s)", "",
             "Memory per rank (GiB) at the recipe's ZeRO stage; activations traced on the meta device:",
             f"{'phase':<12} {'ranks':>5} {'share':>5} {'params':>7} {'grads':>6} {'optim':>6} {'act/img':>8} "
             f"{'ckpt':>6} {'micro':>5} {'need':>6} {'fits':>4} {'max micro':>9} {'ckpt':>5}"]
    for pm in models:
        st = pm.states(stage, precision)
        cfg = getattr(recipe, pm.section)
        micro = engine.accumulation(cfg, pm.ranks, pm.section)[0]
        need = st.total + pm.act(micro, ckpt)
        lines.append(f"{pm.label:<12} {pm.ranks:>5} {pm.share:>5} {_gib(st.params):>7} {_gib(st.grads):>6} "
                     f"{_gib(st.optimizer):>6} {pm.trace.activation_bytes_per_image(False) / 2**20:>6.0f}Mi "
                     f"{pm.trace.activation_bytes_per_image(True) / 2**20:>4.0f}Mi {micro:>5} {_gib(need):>6} "
                     f"{'yes' if need <= CAPACITY * g.memory_bytes else 'NO':>4} "
                     f"{largest_micro(pm, stage, precision, False, g.memory_bytes):>9} "
                     f"{largest_micro(pm, stage, precision, True, g.memory_bytes):>5}")
    lines += [f"model states: {models[0].states(stage, precision).how}",
              "share: images per rank per optimizer step (batch_size / ranks); micro: the recipe's; need: states + "
              "activations at that micro-batch; max micro: without / with checkpointing", ""]
    mine = recipe_setting(recipe.deepspeed)
    recipe_micro = {pm.section: getattr(recipe, pm.section).micro_batch for pm in models}
    lines += [f"Network: {net.how}; {net.gpus_per_node} GPUs per node ({comm.LINKS[g.key].source})", ""]
    lines += _step_lines(f"the recipe's settings ({mine.label()})", models, timing, mine, recipe_micro)
    rec_setting = comm.Setting(rec.zero_stage, precision, rec.communication_dtype, rec.overlap_comm,
                               rec.reduce_bucket_size or comm.DS_BUCKET)
    if (rec_setting, rec.micro) != (mine, recipe_micro):
        lines += _step_lines(f"the recommendation ({rec_setting.label()})", models, timing, rec_setting, rec.micro)
    lines += [f"Recommended for {gpus} x {g.key}: " + " ".join(rec.overrides()),
              f"  (the recipe has: deepspeed.zero_stage={stage} "
              f"deepspeed.communication_dtype={recipe.deepspeed.communication_dtype} "
              f"deepspeed.overlap_comm={_yaml(recipe.deepspeed.overlap_comm)} "
              f"deepspeed.reduce_bucket_size={_yaml(recipe.deepspeed.reduce_bucket_size)} "
              f"speed.checkpointing={str(ckpt).lower()} "
              + " ".join(f"{s}.micro_batch={getattr(recipe, s).micro_batch}" for s in rec.micro) + ")"]
    lines += _candidate_lines(rec, gpus, g.key) + [""]
    lines += _cost_lines(recipe, models, gpus, g, peak, kind, timing, mine, recipe_micro, measured, budget)
    return "\n".join(lines), rec


def _yaml(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _step_lines(title: str, models, timing: Timing, setting: comm.Setting, micro: dict) -> list[str]:
    net = timing.network
    lines = [f"Step time per phase at {title}, per rank per optimizer step (compute at the MFU below; "
             "communication modelled, not measured):",
             f"{'phase':<12} {'ranks':>5} {'nodes':>5} {'busBW':>6} {'micro':>5} {'accum':>5} {'compute s':>9} "
             f"{'comm GB':>7} {'comm s':>7} {'exposed s':>9} {'step s':>7} {'MFU':>6}"]
    for pm in models:
        m, accum = timing.accumulation(pm, micro[pm.section])
        st = timing.step(pm, setting, micro[pm.section])
        proj = timing.mfu_of(pm) * st.compute / st.total
        lines.append(f"{pm.label:<12} {pm.ranks:>5} {net.nodes(pm.ranks):>5} {net.busbw(pm.ranks):>6.0f} {m:>5} "
                     f"{accum:>5} {st.compute:>9.4f} {st.volume / 1e9:>7.2f} {st.comm:>7.4f} {st.exposed:>9.4f} "
                     f"{st.total:>7.4f} {proj:>6.1%}")
    lines += ["busBW: GB/s of the group's collectives; comm GB: bytes each rank sends per optimizer step (ring); "
              "exposed: what the step waits for; MFU: projected, model FLOPs / (step time x peak)", ""]
    return lines


def _candidate_lines(rec: Recommendation, gpus: int, key: str) -> list[str]:
    lower = any(c.setting.stage < 3 for c in rec.candidates)
    fastest = min(c.hours for c in rec.candidates if c.setting.stage < 3 or not lower)
    chosen = (rec.zero_stage, rec.communication_dtype, rec.overlap_comm)
    lines = [f"  settings weighed (every phase's micro-batch as large as at ZeRO-3; device-hours of every phase on "
             f"{gpus} x {key}, E2E included, against the fastest eligible; within {TOLERANCE:.0%} of it: fp32 "
             "communication, then the lower stage, then no overlap):"]
    for c in rec.candidates:
        s = c.setting
        mark = "  <- recommended" if (s.stage, s.communication_dtype, s.overlaps) == chosen else ""
        if s.stage == 3 and lower:
            mark = "  (ZeRO-3: only where memory needs it)"
        lines.append(f"    {s.label():<38} {c.hours:>9.1f} device-h  {c.hours / fastest - 1:>+7.2%}{mark}")
    return lines


def _cost_lines(recipe, models, gpus, g, peak, kind, timing, setting, micro, measured, budget) -> list[str]:
    label = (f"measured ({measured}; {timing.mfu:.0%} assumed where not measured)" if timing.measured
             else f"{timing.mfu:.0%} (assumed)")
    costs = [timing.cost(pm, setting, micro[pm.section]) for pm in models]
    bare = [cost(recipe, pm, peak, timing.mfu_of(pm), timing.n_train, timing.n_val) for pm in models]
    limit = [cost(recipe, pm, peak, 1.0, timing.n_train, timing.n_val) for pm in models]
    lines = [f"Cost on {g.key} at the recipe's settings, compute at MFU {label}, plus the communication the steps wait "
             f"for; {timing.n_train} training images an epoch, {timing.n_val} per evaluation:",
             f"{'phase':<12} {'GFLOP/img':>9} {'epochs':>6} {'PFLOP':>9} {'device-h':>9} {'no comm':>8} {'at 100%':>8}"]
    for pm, c, c0, c1 in zip(models, costs, bare, limit):
        lines.append(f"{c.label:<12} {c.flops_per_image / 1e9:>9.1f} {getattr(recipe, pm.section).epochs:>6} "
                     f"{c.flops / 1e15:>9.0f} {c.device_hours:>9.1f} {c0.device_hours:>8.1f} {c1.device_hours:>8.1f}")
    pipe = [i for i, pm in enumerate(models) if pm.section != "e2e"]
    e2e = [i for i, pm in enumerate(models) if pm.section == "e2e"]
    total, total1 = sum(costs[i].device_hours for i in pipe), sum(limit[i].device_hours for i in pipe)
    lines.append(f"{'assembled pipeline' if 'meta' in sections(recipe) else 'fine-tune'}: {total:.0f} {g.key} "
                 f"device-hours ({total / gpus:.1f} h wall on {gpus} GPUs if every phase keeps them busy; "
                 f"{total1:.0f} device-hours at 100 % MFU without communication)")
    if budget:
        verdict = "meets it" if total <= budget else "does not meet it"
        need = _mfu_for(timing, [models[i] for i in pipe], setting, micro, budget)
        lines.append(f"budget {budget:g} device-hours: the projection above {verdict}; "
                     + (f"it takes an MFU of at least {need:.1%} on the compute (every phase alike; the communication "
                        "as modelled)" if need else "no MFU meets it: the communication alone takes longer"))
    if e2e:
        lines.append(f"E2E baseline: {sum(costs[i].device_hours for i in e2e):.0f} device-hours "
                     f"({sum(limit[i].device_hours for i in e2e):.0f} at 100 % MFU without communication)")
    paper = PAPER.get(model_name(recipe)) if "meta" in sections(recipe) else None
    if paper:
        ratio = getattr(perf.gpu(paper["gpu"]), kind) / peak
        lines.append(f"paper ({model_name(recipe)}, A100): assembled {paper['assembled']:.0f} A100-hours, E2E "
                     f"{paper['e2e']:.0f}; at the paper's efficiency on {g.key} (x {ratio:.3f}, the {kind} peak "
                     f"ratio): {paper['assembled'] * ratio:.0f} and {paper['e2e'] * ratio:.0f} device-hours")
    return lines


def _mfu_for(timing: Timing, models, setting, micro, budget: float) -> float | None:
    """The compute MFU (every phase alike) at which ``models`` take ``budget`` device-hours; None: none does."""
    if timing.hours(models, setting, micro, 1.0) > budget:
        return None
    lo, hi = 1e-4, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if timing.hours(models, setting, micro, mid) > budget else (lo, mid)
    return hi
