"""Recipes: strict schema, helpful errors for unknown keys and bad values, dotted overrides."""
import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, launch_env
from modasm.config import Recipe, describe, flatten, load_recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_in_file_names_it_and_suggests(tmp_path):
    p = write(tmp_path, "incubate:\n  epoch: 3\n")
    with pytest.raises(ValueError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "'incubate.epoch'" in msg and "did you mean 'incubate.epochs'" in msg


def test_unknown_section_suggests_closest(tmp_path):
    with pytest.raises(ValueError, match=r"unknown recipe key 'incubat'; did you mean 'incubate'"):
        load_recipe(write(tmp_path, "incubat:\n  epochs: 3\n"))


def test_unknown_override_names_it_and_suggests():
    with pytest.raises(ValueError, match=r"unknown override key 'incubate.epoch' .*did you mean 'incubate.epochs'"):
        load_recipe(TINY, ["incubate.epoch=2"])
    with pytest.raises(ValueError, match=r"'deepspeed.zero'.*did you mean 'deepspeed.zero_stage'"):
        load_recipe(TINY, ["deepspeed.zero=2"])
    with pytest.raises(ValueError, match=r"must look like section.key=value"):
        load_recipe(TINY, ["incubate.epochs"])


@pytest.mark.parametrize("override,key", [("meta.epochs=abc", "meta.epochs"), ("model.qkv_bias=3", "model.qkv_bias"),
                                          ("deepspeed.zero_stage=5", "zero_stage"), ("model.split=[0,2]", "split"),
                                          ("deepspeed.precision=fp16", "precision"), ("meta.batch_size=0", "batch_size"),
                                          ("model.num_heads=5", "num_heads")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_recipe(TINY, [override])


def test_overrides_apply_and_sections_keep_their_defaults(tmp_path):
    base = load_recipe(TINY)
    r = load_recipe(TINY, ["incubate.epochs=2", "model.split=[4,3,3]", "e2e.lr=3e-3", "run.name=x"])
    assert r.model.K == 3 and isinstance(r.e2e.lr, float)
    # exactly the overridden keys changed; everything else is still what the file says
    before, after = flatten(base.to_dict()), flatten(r.to_dict())
    assert before.keys() == after.keys()
    assert {k: after[k] for k in after if after[k] != before[k]} == {
        "incubate.epochs": 2, "model.split": [4, 3, 3], "e2e.lr": 3e-3, "run.name": "x"}
    # a partial section keeps that phase's own defaults (fine-tune: no warm-up, clipping 1.0), and every
    # other section keeps its defaults: the recipe is the default recipe with that one key set
    r = load_recipe(write(tmp_path, "assemble:\n  epochs: 5\n"))
    assert r.assemble.epochs == 5 and r.assemble.warmup_epochs == 0 and r.assemble.clip_grad == 1.0
    assert r == dataclasses.replace(Recipe(), assemble=dataclasses.replace(Recipe().assemble, epochs=5))
    assert r.meta.warmup_epochs == 20 and r.meta.epochs == 300  # the paper's values, spelled out
    assert isinstance(Recipe().assemble.lr, float)


def test_every_key_is_documented():
    lines = describe()
    assert any(l.startswith("incubate.epochs = ") for l in lines)
    assert all(l.split("# ", 1)[1].strip() for l in lines), "a recipe key without help text"


def test_cli_reports_unknown_override_and_exits_2():
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "meta.py"), str(ROOT / "recipes" / "demo-fmnist.yaml"),
                          "meta.epoch=3"], capture_output=True, text=True, env=launch_env(), timeout=120)
    assert res.returncode == 2
    assert "meta.epoch" in res.stderr and "did you mean 'meta.epochs'" in res.stderr
    assert "Traceback" not in res.stderr


def test_user_errors_are_one_line_other_errors_keep_their_traceback(capsys):
    from modasm import cli
    from modasm.errors import UserError

    def user():
        raise UserError("data.root /nowhere does not exist")
    with pytest.raises(SystemExit) as e:
        cli.main(user)
    assert e.value.code == 2 and capsys.readouterr().err == "error: data.root /nowhere does not exist\n"

    def bug():  # e.g. a ValueError from inside torch: not the user's to fix, keep the traceback
        raise ValueError("Expected input batch_size (3) to match target batch_size (4)")
    with pytest.raises(ValueError, match="Expected input batch_size"):
        cli.main(bug)
