"""Fast paths give the plain path's results (on CPU here; measured on GPUs by benchmarks/gpu_check.sh)."""
import pytest
import torch

from conftest import assert_same_training, random_batches, train_steps
from modasm import model as M
from modasm import speed
from modasm.config import SpeedConfig


@pytest.mark.parametrize("k", [0, 1])
def test_checkpointing_gives_identical_gradients(tiny, k):
    """hybrid(k) with activation checkpointing: the same loss and bit-identical gradients of module k."""
    cfg = tiny("model.split=[2,2]").model
    x, y = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = speed.prepare_model(M.build_hybrid(cfg, k, None), SpeedConfig(checkpointing=ckpt, compile=False),
                                    torch.device("cpu"))
        assert model.grad_checkpointing == ckpt
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert grads[0][0] == grads[1][0]
    assert grads[0][1].keys() == grads[1][1].keys() and all(torch.equal(grads[0][1][n], grads[1][1][n])
                                                            for n in grads[0][1])


def test_auto_flags_follow_the_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not speed.wanted(None, cpu) and speed.wanted(None, gpu) and speed.wanted(True, cpu)
    assert speed.optimizer_kwargs(SpeedConfig(), cpu) == {} and speed.optimizer_kwargs(SpeedConfig(), gpu) == {"fused": True}


# ---------------------------------------------------------------- fused attention


def test_fused_attention_is_on_and_matches_the_explicit_path(tiny):
    """Every timm attention block uses F.scaled_dot_product_attention by default; off, the same outputs. In float64:
    the two paths differ only in the order of their roundings, <= ~1e3 roundings of u = 1.1e-16 of values of order 1
    per logit (~1e-13), while a wrong attention (no scale, no softmax, other heads) moves logits by O(1e-2) or more;
    ATOL = 1e-10 lies between (in fp32 the rounding, 6e-8 per operation, would set the tolerance instead, and how
    much of it accumulates depends on the CPU's vector width and thread count)."""
    cfg = tiny().model
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = speed.prepare_model(M.build_target(cfg), SpeedConfig(fused_attention=fused, compile=False),
                                    torch.device("cpu")).eval().double()
        blocks = speed.attention_blocks(model)
        assert len(blocks) == sum(cfg.split) and all(b.fused_attn is fused for b in blocks)
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-10)
    assert outs[0].abs().max() > 1e-2  # logits that a wrong attention would move
    assert SpeedConfig().fused_attention is True


# ---------------------------------------------------------------- activation checkpointing


def _forward_calls(model) -> list[int]:
    calls = [0] * len(model.blocks)
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("k", [0, 1, 2])
def test_checkpointing_recomputes_only_blocks_whose_backward_runs(tiny, k):
    """hybrid(k) of K=3: the frozen blocks before module k run once; module k's blocks and the frozen
    blocks after it (they pass gradients back to module k) run twice, the second time in the backward."""
    cfg = tiny("model.split=[2,2,2]").model
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    layout = M.hybrid_layout(cfg.split, k)
    start = M.block_range(layout, k).start
    for ckpt in (False, True):
        model = speed.prepare_model(M.build_hybrid(cfg, k, None), SpeedConfig(checkpointing=ckpt, compile=False),
                                    torch.device("cpu"))
        calls = _forward_calls(model)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        assert calls == [1] * start + [2 if ckpt else 1] * (len(calls) - start), (ckpt, calls)


@pytest.mark.slow
def test_checkpointing_through_the_engine_is_bit_identical(tiny, dist_info):
    """Incubating module 1 through DeepSpeed (the real loop) with and without checkpointing: the same
    losses and bit-identical shards."""
    import json

    from safetensors.torch import load_file

    from modasm import phases
    from modasm.metrics import read_jsonl
    base = tiny("incubate.log_every_steps=1", "model.split=[2,2]")
    phases.run_meta(base, dist_info)
    got = []
    for ckpt in (False, True):
        recipe = tiny("incubate.log_every_steps=1", "model.split=[2,2]", f"speed.checkpointing={str(ckpt).lower()}",
                      f"run.name=ckpt-{ckpt}")
        (recipe.run_dir / "meta").parent.mkdir(parents=True, exist_ok=True)
        import shutil
        shutil.copytree(base.run_dir / "meta", recipe.run_dir / "meta")
        phases.run_incubate(recipe, 1, dist_info)
        out = phases.phase_dir(recipe, "incubate", 1)
        losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
        got.append((losses, load_file(str(out / "export" / "module-01.safetensors")),
                    json.loads((out / "export" / "manifest.json").read_text())["metrics"]["top1"]))
    assert len(got[0][0]) == 8 and got[0][0] == got[1][0]
    assert got[0][1].keys() == got[1][1].keys() and all(torch.equal(got[0][1][n], got[1][1][n]) for n in got[0][1])
    assert got[0][2] == got[1][2]


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compile_through_the_engine_matches_eager(tiny, dist_info):
    """torch.compile (inductor, C++ on this CPU) through DeepSpeed and the real loop: losses within 1e-5 of
    eager over the first 5 optimizer steps (8 in all); parameter names, and so the shards, unchanged."""
    from safetensors.torch import load_file

    from modasm import phases
    from modasm.metrics import read_jsonl
    runs = []
    for compiled in (False, True):
        recipe = tiny("e2e.log_every_steps=1", f"speed.compile={str(compiled).lower()}", f"run.name=compile-{compiled}")
        phases.run_e2e(recipe, dist_info)
        out = phases.phase_dir(recipe, "e2e")
        runs.append(([r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"],
                     load_file(str(out / "export" / "module-00.safetensors"))))
    (eager, a), (comp, b) = runs
    assert len(eager) == len(comp) == 8
    assert max(abs(x - y) for x, y in zip(eager[:5], comp[:5])) <= 1e-5, (eager, comp)
    recipe = tiny()
    assert_same_training(a, b, 1e-4, recipe.e2e.lr * recipe.e2e.batch_size / 512, 8, "compiled vs eager:")


# ---------------------------------------------------------------- fused AdamW under DeepSpeed's wrappers

# Each AdamW step is checked against AdamW computed in float64 from the same fp32 inputs (weights, gradient,
# moments), not one run against the other: from the second step on the two runs see different gradients, and
# Adam's m/sqrt(v) turns gradients that are pure rounding noise (a key bias: softmax ignores it, so its exact
# gradient is 0) into lr-sized moves, so how far the runs drift apart depends on how each machine rounds
# (thread count, vector width), not on the optimizer being right.
U32 = 2.0 ** -24  # unit roundoff of float32
# Rounding budget per magnitude. Each fp32 rounding adds a relative error <= U32 of the value it rounds (fp32 casts of
# the constants beta, 1 - beta, 1 - lr * wd, step size, sqrt of the bias correction, eps count as roundings too), so
# a result's error is <= U32 x the sum of the magnitudes its roundings act on. Counted on torch's fused CPU kernel
# and its single-tensor path: a moment <= 4 roundings of its terms; a weight <= 3 of |w|, and <= 14 of the update
# |size x q| (m: 4; the denominator: 7 (half of v's 4 through the sqrt, the sqrt, the bias correction and eps, each
# cast and applied); the division; the step size's cast and product). The bound takes ROUNDINGS = 8 per magnitude
# and the update's twice (m_mag / denom >= |q|): >= 16 for the update, room for second-order terms and for another
# order of the same operations. Measured here: at most 0.34 of the bound.
ROUNDINGS = 8


class AdamWReference:
    """Checks every step of a torch AdamW (the ``basic_optimizer`` inside DeepSpeed's wrappers, which hand it
    flat fp32 partitions) element by element against AdamW in float64 from the step's own inputs, within
    ROUNDINGS x U32 of the magnitudes each result is computed from; records each step's hyperparameters."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.hyper, self.calls, self.elements = [], 0, 0
        opt.register_step_pre_hook(self._before)
        opt.register_step_post_hook(self._after)

    def _before(self, opt, args, kwargs):
        self.hyper.append([{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}
                           for g in opt.param_groups])
        self.inputs = []
        for group in opt.param_groups:
            assert not group["amsgrad"] and not group["maximize"] and group.get("decoupled_weight_decay", True), group
            for p in group["params"]:
                if p.grad is None:
                    continue
                assert p.dtype == p.grad.dtype == torch.float32, "the bound is for fp32 master weights"
                st = opt.state.get(p) or {}
                zero = torch.zeros_like(p, dtype=torch.float64)
                self.inputs.append((group, p, p.detach().double(), p.grad.double(),
                                    st["exp_avg"].double() if st else zero, st["exp_avg_sq"].double() if st else zero,
                                    int(st["step"]) if st else 0))

    def _after(self, opt, args, kwargs):
        self.calls += 1
        for group, p, w, g, m, v, t in self.inputs:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            st, t = opt.state[p], t + 1
            assert int(st["step"]) == t
            m_new, v_new = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            denom = v_new.sqrt() / (1 - b2 ** t) ** 0.5 + eps
            size = lr / (1 - b1 ** t)
            q = m_new / denom
            w_new = w * (1 - lr * wd) - size * q
            m_mag = b1 * m.abs() + (1 - b1) * g.abs()
            for what, got, want, mag in (
                    ("exp_avg", st["exp_avg"], m_new, m_mag),
                    ("exp_avg_sq", st["exp_avg_sq"], v_new, v_new),  # two non-negative terms
                    ("weight", p.detach(), w_new, w.abs() + size * (m_mag / denom + q.abs()))):
                err, bound = (got.double() - want).abs(), ROUNDINGS * U32 * mag
                i = int((err - bound).argmax())
                assert err.flatten()[i] <= bound.flatten()[i], (
                    f"AdamW step {t}, {what} of a {tuple(p.shape)} parameter, element {i}: got "
                    f"{got.flatten()[i].item():.9g}, float64 AdamW from the same inputs "
                    f"{want.flatten()[i].item():.9g}, "
                    f"|diff| {err.flatten()[i].item():.3g} > fp32 rounding bound {bound.flatten()[i].item():.3g}")
            self.elements += p.numel()


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "bf16"), (2, "bf16"), (2, "fp32"), (3, "bf16")])
def test_fused_adamw_under_deepspeed_matches_the_plain_one(tiny, dist_info, zero, precision):
    """torch's fused AdamW (also on CPU since torch 2.4) inside DeepSpeed's optimizers (ZeRO-1 bf16 =
    BF16_Optimizer, ZeRO-2 and 3, plain fp32) steps as the plain one does: the fused kernel runs (the plain one's
    ops without it), both optimizers get the same hyperparameters at every step, and every step of both is AdamW
    to fp32 rounding (AdamWReference)."""
    from torch.profiler import ProfilerActivity, profile

    from modasm import engine as ds
    recipe = tiny(f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}")
    p = ds.plan(recipe.e2e, 1, "e2e", n_train=256)
    batches = random_batches(4, 64, seed=3)
    states, checks = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = M.build_target(recipe.model)
        eng, _ = ds.build_engine(model, recipe.e2e, recipe.deepspeed, dist_info, p,
                                 speed.optimizer_kwargs(SpeedConfig(fused_optimizer=fused), torch.device("cpu")))
        assert eng.basic_optimizer.defaults["fused"] is (True if fused else None)
        checks.append(AdamWReference(eng.basic_optimizer))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            states.append(train_steps(eng, batches))
        ops = {e.name for e in prof.events()}
        assert ("aten::_fused_adamw_" in ops) is fused, \
            f"fused={fused}: AdamW ops that ran: {sorted(o for o in ops if 'adam' in o)}"
        steps = [int(s["step"]) for s in eng.basic_optimizer.state.values()]
        assert steps == [len(batches)] * len(steps) and checks[-1].calls >= len(batches) and checks[-1].elements > 0
    assert checks[0].hyper == checks[1].hyper and len(checks[0].hyper) >= len(batches)
    assert states[0].keys() == states[1].keys()
    torch.manual_seed(0)
    start = M.build_target(recipe.model).state_dict()  # the weights both engines started from
    assert all(any(not torch.equal(s[n], start[n]) for n in s) for s in states)  # both trained


def test_pinned_batches_only_with_a_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert speed.pin_memory(SpeedConfig(), gpu) and not speed.pin_memory(SpeedConfig(), cpu)
    assert not speed.pin_memory(SpeedConfig(pin_memory=True), cpu)  # nothing to copy to: no pinning
    assert not speed.pin_memory(SpeedConfig(pin_memory=False), gpu)


@pytest.mark.parametrize("name", ["vit-b16", "vit-l16", "vit-h14", "vit-h14-392"])
def test_shipped_recipes_turn_the_fast_paths_on_with_a_gpu(name):
    from conftest import ROOT
    from modasm.config import load_recipe
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    s = r.speed
    assert speed.wanted(s.compile, gpu) and speed.optimizer_kwargs(s, gpu) == {"fused": True} and s.fused_attention
    assert speed.wanted(s.uint8_batches, gpu) and speed.pin_memory(s, gpu)
    assert not speed.wanted(s.compile, cpu) and speed.optimizer_kwargs(s, cpu) == {}  # a CPU run stays plain
    assert r.data.backend == "nvjpeg" and r.deepspeed.precision == "bf16"
    assert r.deepspeed.grad_accum_dtype == r.deepspeed.communication_dtype == "fp32"
    assert "Fast paths (issue 13)" in (ROOT / "recipes" / f"{name}.yaml").read_text().split("\nrun:")[0]
