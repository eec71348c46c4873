"""The DeepSpeed engine takes ZeRO stage, precision, clipping and accumulation from the recipe."""
import pytest

from conftest import assert_export_is_master
from modasm import engine as ds
from modasm import model as M
from modasm import phases


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")])
def test_engine_follows_recipe(tiny, dist_info, zero, precision):
    recipe = tiny(f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}",
                  "e2e.accum_steps=2", "e2e.clip_grad=0.5", "e2e.batch_size=32")
    model = M.build_target(recipe.model)
    eng, sched = ds.build_engine(model, recipe.e2e, recipe.deepspeed, dist_info, "e2e", total_steps=10,
                                 steps_per_epoch=5)
    assert eng.zero_optimization_stage() == zero
    assert eng.bfloat16_enabled() == (precision == "bf16")
    assert eng.gradient_accumulation_steps() == 2
    assert eng.gradient_clipping() == 0.5
    assert eng.train_micro_batch_size_per_gpu() == 16
    # the lr is scaled per 512 images and warmed up / decayed per optimizer step
    peak = recipe.e2e.lr * 32 / 512
    assert sched.get_last_lr()[0] == pytest.approx(peak * ds.lr_lambda(peak, recipe.e2e.min_lr, 0, 10)(0))


def test_micro_batch_must_divide(tiny):
    recipe = tiny("e2e.batch_size=30", "e2e.accum_steps=4")
    with pytest.raises(ValueError, match=r"e2e.batch_size=30 .*accum_steps"):
        ds.micro_batch(recipe.e2e, 2, "e2e")


def test_lr_schedule_warms_up_per_step_not_per_epoch():
    f = ds.lr_lambda(1.0, 0.01, warmup_steps=100, total_steps=1000)
    assert f(0) == pytest.approx(0.01) and f(49) == pytest.approx(0.5) and f(99) == pytest.approx(1.0)
    assert f(550) == pytest.approx(0.505, abs=1e-3) and f(1000) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(100, 999))


@pytest.mark.parametrize("zero,precision", [(3, "bf16"), (2, "fp32")])
def test_zero_export_holds_full_weights(tiny, dist_info, zero, precision):
    """ZeRO partitions the parameters (3) or the fp32 master weights (2, and 3); the exported shards still
    hold every full tensor, and they are the trained master weights (bf16: rounded to bf16)."""
    recipe = tiny(f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}", "data.train_limit=128")
    metrics = phases.run_e2e(recipe, dist_info)
    assert metrics["steps"] == 2 and metrics["eval_samples"] == 256
    assert_export_is_master(phases.export_dir(recipe, "e2e"), phases.phase_dir(recipe, "e2e") / "ckpt",
                            recipe.model, recipe.model.split, bf16=precision == "bf16")
