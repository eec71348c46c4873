"""launch/bench.py: the phase's real model and engine on synthetic batches; its configurations and JSON rows."""
import json

import pytest
import torch

from conftest import TINY, launch
from modasm import bench


def test_configs_follow_the_recipe_and_sweep(tiny):
    recipe = tiny("incubate.micro_batch=16", "speed.checkpointing=true")
    cpu = torch.device("cpu")
    assert bench.recipe_micro(recipe, "incubate", 1) == 16 and bench.recipe_micro(recipe, "meta", 2) == 32
    assert bench.configs(recipe, "incubate", 1, cpu) == [(16, False, True)]  # compile: null = off on CPU
    assert bench.configs(recipe, "incubate", 1, torch.device("cuda", 0)) == [(16, True, True)]
    sweep = bench.configs(recipe, "incubate", 1, cpu, sweep=True)
    assert len(sweep) == 12 and {m for m, _, _ in sweep} == {8, 16, 32}
    assert bench.configs(recipe, "meta", 1, cpu, micro=[4], compile_="both", checkpointing="off") == \
        [(4, False, False), (4, True, False)]


@pytest.mark.slow
def test_bench_cli(tmp_path, dist_info):
    out = tmp_path / "bench.json"
    res = launch("bench.py", str(TINY), "--phase", "meta,incubate", "--module", "-1", "--micro", "8",
                 "--checkpointing", "both", "--steps", "2", "--warmup", "1", "--json", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["phase"], r["k"], r["checkpointing"]) for r in rows] == [
        ("meta", None, False), ("meta", None, True), ("incubate", 1, False), ("incubate", 1, True)]
    for r in rows:
        assert r["error"] is None and r["micro"] == 8 and r["img_per_s"] > 0 and r["flops_per_image"] > 0
        assert r["tflops"] == pytest.approx(r["flops_per_image"] * r["img_per_s"] / 1e12)
        assert 0 < r["mfu"] < 1 and "probe" in r["peak_source"] and r["peak_gib"] is None and r["estimate_gib"] > 0
    assert rows[0]["flops_per_image"] != rows[2]["flops_per_image"]  # meta vs hybrid(K-1)
    assert "incubate[1]" in res.stdout and "MFU %" in res.stdout
    # the measured MFU feeds the estimate
    from modasm.estimate import measured_mfu
    assert set(measured_mfu(out)) == {("meta", None), ("incubate", 1)}
