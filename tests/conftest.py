import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def tiny(tmp_path):
    """The tiny test recipe with its outputs under this test's tmp dir."""
    from modasm.config import load_recipe
    return lambda *ov: load_recipe(TINY, [f"run.out_dir={tmp_path}", *ov])


@pytest.fixture(scope="session")
def dist_info():
    """A real gloo process group of one (what a lone `python launch/x.py` gets)."""
    from modasm import dist
    return dist.init()


def launch(script: str, *args: str, nproc: int = 0, timeout: int = 300, env=None):
    """Run an entry point as a user would: python launch/x.py or torchrun --nproc-per-node=N."""
    import subprocess
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
           if nproc else [sys.executable])
    cmd += [str(ROOT / "launch" / script), *args]
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
