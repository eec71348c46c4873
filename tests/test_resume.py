"""Re-runs: a stop request checkpoints; changed settings are refused, never silently mixed."""
import pytest

from modasm import phases, train
from modasm.engine import complete_steps


def test_stop_then_resume_and_changed_settings_are_refused(tiny, dist_info):
    recipe = tiny("data.train_limit=256")
    train.request_stop()  # what SIGUSR1 does: checkpoint at the next optimizer step and return
    first = phases.run_e2e(recipe, dist_info)
    assert first == {"interrupted": True, "step": 1}
    ckpt = phases.phase_dir(recipe, "e2e") / "ckpt"
    assert complete_steps(ckpt) == [1]

    with pytest.raises(ValueError, match=r"step-00000001 was made with other settings \(e2e\.lr: 0\.002 -> 0\.003"):
        phases.run_e2e(tiny("data.train_limit=256", "e2e.lr=3e-3"), dist_info)
    assert complete_steps(ckpt) == [1]  # the refused run touched nothing

    done = phases.run_e2e(tiny("data.train_limit=256", "e2e.log_every_steps=1"), dist_info)  # inert key
    assert done["steps"] == 4 and complete_steps(ckpt)[-1] == 4

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
