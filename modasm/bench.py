"""How fast a phase trains here: the phase's real model and DeepSpeed engine on synthetic batches.

``run_config`` builds the model as ``phases.run_phase`` does (``PHASES[phase].build``; fresh weights stand in
for the upstream shard sets, which change values, not cost), prepares it and builds its engine as
``train.train`` does (``speed.prepare_model``, ``engine.plan``, ``engine.build_engine``), then times ``steps``
optimizer steps after ``warmup`` (compilation happens there). No data loader: one random batch on the device.
An optimizer step is ``accum`` micro-batches (default 1: every micro-step includes the optimizer's step).
Reported per rank: img/s, model TFLOP/s and MFU (``perf``), the allocator's peak (CUDA), and the memory
``estimate`` predicts for the same configuration, so a GPU run checks the estimate.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import engine, estimate, perf, phases, seeds, speed
from .config import Recipe
from .dist import DistInfo, barrier


@dataclass
class Result:
    model: str
    phase: str
    k: int | None
    micro: int
    accum: int
    world: int
    compile: bool
    checkpointing: bool
    img_per_s: float | None = None      # per rank
    cpu_s: float | None = None          # host CPU seconds per optimizer step (all threads of this process)
    tflops: float | None = None         # model TFLOP/s per rank
    mfu: float | None = None
    peak_gib: float | None = None       # torch.cuda.max_memory_allocated (None on CPU)
    estimate_gib: float | None = None   # modasm.estimate's states + activations for this configuration
    flops_per_image: float | None = None
    device: str = ""
    peak_source: str = ""
    error: str | None = None

    @property
    def label(self) -> str:
        return phases.label(self.phase, self.k)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(recipe: Recipe, phase: str, k: int | None, info: DistInfo, micro: int, compile_: bool,
               checkpointing: bool, steps: int = 10, warmup: int = 3, accum: int = 1) -> Result:
    res = Result(estimate.model_name(recipe), phase, k, micro, accum, info.world, compile_, checkpointing,
                 device=_device_name(info.device))
    spec = phases.PHASES[phase]
    cfg = dataclasses.replace(getattr(recipe, phase), micro_batch=0, accum_steps=accum,
                              batch_size=micro * accum * info.world)
    fast = dataclasses.replace(recipe.speed, compile=compile_, checkpointing=checkpointing)
    model = eng = None
    try:
        torch.manual_seed(seeds.init(recipe.run.seed, spec.salt(k)))
        with torch.device(info.device):  # initialised where it trains (a ViT-H initialises slowly on a CPU)
            model = spec.build(recipe, k, None)
        dtype = torch.bfloat16 if recipe.deepspeed.precision == "bf16" else torch.float32
        trace = perf.trace_step(model, dtype=dtype)
        meter = perf.Meter(trace.flops_per_image, perf.peak(info.device, recipe.deepspeed.precision,
                                                            recipe.run.peak_tflops))
        pm = estimate.PhaseModel(res.label, phase, k, info.world, micro, sum(p.numel() for p in model.parameters()),
                                 sum(p.numel() for p in model.parameters() if p.requires_grad),
                                 max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
                                 trace)
        res.estimate_gib = (pm.states(recipe.deepspeed.zero_stage, recipe.deepspeed.precision).total
                            + pm.act(micro, checkpointing)) / 2**30
        res.flops_per_image, res.peak_source = trace.flops_per_image, meter.peak.source
        plan = engine.plan(cfg, info.world, phase, n_train=cfg.batch_size)
        speed.prepare_model(model, fast, info.device)
        eng, _ = engine.build_engine(model, cfg, recipe.deepspeed, info, plan,
                                     speed.optimizer_kwargs(fast, info.device))
        g = torch.Generator(device=info.device).manual_seed(0)
        pe = model.patch_embed
        x = torch.randn(micro, pe.proj.in_channels, *pe.img_size, device=info.device, generator=g)
        x = x.to(engine.input_dtype(eng))
        y = torch.randint(0, recipe.model.num_classes, (micro,), device=info.device, generator=g)

        def step():
            for _ in range(accum):
                loss = F.cross_entropy(eng(x).float(), y, label_smoothing=cfg.label_smoothing)
                eng.backward(loss)
                eng.step()

        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(info.device)
        for _ in range(warmup):
            step()
        _sync(info.device)
        barrier(info)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        _sync(info.device)
        elapsed = time.perf_counter() - start
        res.img_per_s, res.cpu_s = steps * accum * micro / elapsed, (time.process_time() - cpu) / steps
        res.tflops, res.mfu = meter.fields(res.img_per_s).values()
        if info.device.type == "cuda":
            res.peak_gib = torch.cuda.max_memory_allocated(info.device) / 2**30
    except torch.cuda.OutOfMemoryError:
        res.error = "OOM"
    except Exception as e:  # one failing configuration must not hide the others' figures
        res.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        traceback.print_exc()
    finally:
        if eng is not None and hasattr(eng, "destroy"):
            eng.destroy()
        model = eng = None
        torch._dynamo.reset()  # compiled graphs of this model go with it
        if info.device.type == "cuda":  # the next configuration needs the memory back now
            gc.collect()
            torch.cuda.empty_cache()
    return res


def recipe_micro(recipe: Recipe, phase: str, world: int) -> int:
    """The micro-batch the recipe trains this phase with on ``world`` ranks."""
    return engine.accumulation(getattr(recipe, phase), world, phase)[0]


def configs(recipe: Recipe, phase: str, world: int, device: torch.device, micro: list[int] | None = None,
            compile_: str = "recipe", checkpointing: str = "recipe", sweep: bool = False) -> list[tuple]:
    """(micro, compile, checkpointing) to measure; ``sweep``: micro-batch (half, as is, double) x compile x
    checkpointing. 'recipe' takes the recipe's setting (``speed.compile: null`` = on with a GPU)."""
    m = recipe_micro(recipe, phase, world)
    micros = micro or ([max(1, m // 2), m, 2 * m] if sweep else [m])

    def flags(choice, current):
        return {"recipe": [current], "on": [True], "off": [False], "both": [False, True]}[choice]
    comp = flags("both" if sweep else compile_, speed.wanted(recipe.speed.compile, device))
    ckpt = flags("both" if sweep else checkpointing, recipe.speed.checkpointing)
    return [(mb, c, a) for mb in micros for c in comp for a in ckpt]


def run(recipe: Recipe, info: DistInfo, phase_list: list[str], modules: list[int], micro: list[int] | None = None,
        compile_: str = "recipe", checkpointing: str = "recipe", sweep: bool = False, steps: int = 10,
        warmup: int = 3, json_path: str | None = None, deadline: float | None = None,
        recipe_path: str = "", echo=None) -> list[Result]:
    """Every configuration of every phase (incubation: of each module in ``modules``; -1 = K-1), in turn;
    each row appended to ``json_path`` and passed to ``echo`` (a print function) as soon as it is measured,
    so a run stopped early keeps what it measured. Past ``deadline`` (unix time) the rest are skipped."""
    K, results = recipe.model.K, []
    if echo:
        echo(header())
    for phase in phase_list:
        for k in (sorted({m % K for m in modules}) if phase == "incubate" else [None]):
            for mb, comp, ckpt in configs(recipe, phase, info.world, info.device, micro, compile_, checkpointing,
                                          sweep):
                if deadline and time.time() > deadline:
                    r = Result(estimate.model_name(recipe), phase, k, mb, 1, info.world, comp, ckpt,
                               device=_device_name(info.device), error="skipped: time budget")
                else:
                    r = run_config(recipe, phase, k, info, mb, comp, ckpt, steps, warmup)
                results.append(r)
                if json_path and info.is_main:
                    write_json(json_path, [r], recipe_path)
                if echo:
                    echo(row(r))
    if echo:
        echo(footer(results))
    return results


def failed(results: list[Result]) -> bool:
    """A configuration that broke (out of memory and skipped ones are results, not failures)."""
    return any(r.error and r.error != "OOM" and not r.error.startswith("skipped") for r in results)


def header() -> str:
    head = (f"{'model':<10} {'phase':<12} {'micro':>5} {'compile':>7} {'ckpt':>4} {'img/s':>8} {'TFLOP/s':>8} "
            f"{'MFU %':>6} {'peak GiB':>8} {'est. GiB':>8}")
    return head + "\n" + "-" * len(head)


def row(r: Result) -> str:
    def f(v, spec):
        return "—" if v is None else format(v, spec)
    tail = (f"{f(r.img_per_s, '8.1f')} {f(r.tflops, '8.3f')} {f(None if r.mfu is None else 100 * r.mfu, '6.1f')} "
            f"{f(r.peak_gib, '8.2f')}" if r.error is None else f"{r.error:>32}")
    return (f"{r.model:<10} {r.label:<12} {r.micro:>5} {'on' if r.compile else 'off':>7} "
            f"{'on' if r.checkpointing else 'off':>4} {tail} {f(r.estimate_gib, '8.2f')}")


def footer(results: list[Result]) -> str:
    measured = next((r for r in results if r.peak_source), results[0] if results else None)
    if measured is None:
        return ""
    return (f"per rank; {measured.world} rank(s) of {measured.device}; MFU against "
            f"{measured.peak_source or 'no known peak'}; synthetic batches, one micro-batch per optimizer step; "
            "peak: allocator high-water mark; est.: launch/estimate.py's states + activations")


def table(results: list[Result]) -> str:
    return "\n".join([header(), *map(row, results), footer(results)])


def write_json(path: str | Path, results: list[Result], recipe_path: str) -> None:
    path = Path(path)
    old = json.loads(path.read_text())["results"] if path.is_file() else []  # several runs append to one file
    rows = old + [{**dataclasses.asdict(r), "recipe": recipe_path} for r in results]
    path.write_text(json.dumps({"results": rows}, indent=1))
