"""Re-runs: a stop request checkpoints; changed settings are refused, never silently mixed; the resume runs in
a new process, as after a preemption, and ends where an uninterrupted run ends."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, launch
from modasm import phases
from modasm.engine import complete_steps
from modasm.train import STOP_FILE_ENV


def test_stop_then_resume_and_changed_settings_are_refused(tiny, dist_info, tmp_path, monkeypatch, one_thread):
    recipe = tiny("data.train_limit=256")
    stop = tmp_path / "stop"
    stop.touch()  # what the Slurm scripts do on the time-limit signal: checkpoint at the next optimizer step
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    first = phases.run_e2e(recipe, dist_info)
    monkeypatch.delenv(STOP_FILE_ENV)
    assert first == {"interrupted": True, "step": 1}
    ckpt = phases.phase_dir(recipe, "e2e") / "ckpt"
    assert complete_steps(ckpt) == [1]

    with pytest.raises(ValueError, match=r"step-00000001 was made with other settings \(e2e\.lr: 0\.002 -> 0\.003"):
        phases.run_e2e(tiny("data.train_limit=256", "e2e.lr=3e-3"), dist_info)
    assert complete_steps(ckpt) == [1]  # the refused run touched nothing

    # the resume is a new process: nothing but what is on disk carries over
    res = launch("e2e.py", str(TINY), f"run.out_dir={tmp_path}", "data.train_limit=256",
                 "e2e.log_every_steps=1")  # an inert key may change
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "resuming from step 1/4" in res.stdout
    done = json.loads((phases.export_dir(recipe, "e2e") / "manifest.json").read_text())["metrics"]
    assert done["steps"] == 4 and complete_steps(ckpt)[-1] == 4
    # ... and ends with the weights of a run never interrupted (this process, one thread as the launch)
    straight = phases.run_e2e(tiny("data.train_limit=256", "run.name=straight"), dist_info)
    for m in range(2):
        a = load_file(str(phases.export_dir(recipe, "e2e") / f"module-{m:02d}.safetensors"))
        b = load_file(str(tmp_path / "straight" / "e2e" / "export" / f"module-{m:02d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"module {m} differs after resume"
    assert straight["top1"] == done["top1"] and straight["eval_loss"] == done["eval_loss"]

    with pytest.raises(ValueError, match=r"export was made with other settings \(e2e\.epochs: 1 -> 2\)"):
        phases.run_e2e(tiny("data.train_limit=256", "e2e.epochs=2"), dist_info)
    with pytest.raises(ValueError, match=r"model\.embed_dim: 32 -> 48"):
        phases.run_e2e(tiny("data.train_limit=256", "model.embed_dim=48"), dist_info)
    assert phases.run_e2e(recipe, dist_info) == done  # unchanged: nothing to do, same metrics


def test_an_epoch_with_fewer_batches_than_planned_is_an_error(tiny, dist_info):
    """A loader that ends early (data changed under the run) stops the phase; it never re-enters the epoch."""
    import itertools

    import pytest
    from modasm.data import build_datasets
    recipe = tiny("data.train_limit=256")
    train_ds, val_ds = build_datasets(recipe.data, recipe.model.img_size, 0)
    full = train_ds.loader

    class Short:
        def __init__(self):
            self.inner = full()

        def __iter__(self):
            return itertools.islice(iter(self.inner), 3)
    train_ds.loader = Short  # 3 of the 4 micro-batches of the epoch
    with pytest.raises(ValueError, match=r"epoch 0 gave 3 of the 4 micro-batches planned"):
        phases.run_phase(recipe, "e2e", dist_info, data=lambda: (train_ds, val_ds))
