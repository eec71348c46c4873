import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# As in an activated venv (and in the Slurm jobs): the venv's ninja builds DeepSpeed's JIT ops. Another
# ninja on PATH keeps another build log, and each switch recompiles them (~50 s on 2 cores).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


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


def launch_cmd(script: str, *args: str, nproc: int = 0) -> list[str]:
    """python launch/x.py ... or torchrun --nproc-per-node=N launch/x.py ..."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
           if nproc else [sys.executable])
    return cmd + [str(ROOT / "launch" / script), *args]


def launch_env(**extra) -> dict:
    # One thread per process: the same numerics in every launch of a test, and no oversubscription.
    # A child is its own world: drop any rank variables of this process.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def launch(script: str, *args: str, nproc: int = 0, timeout: int = 300, env=None):
    """Run an entry point as a user would and capture its output."""
    import subprocess
    return subprocess.run(launch_cmd(script, *args, nproc=nproc), capture_output=True, text=True,
                          timeout=timeout, env=launch_env(**(env or {})), cwd=ROOT)
