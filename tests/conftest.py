import os
import signal
import subprocess
import sys
import time
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


def random_batches(n: int, size: int, seed: int) -> list[tuple]:
    """``n`` seeded batches of ``size`` random tiny-recipe images (1x28x28) and labels, for engine-level tests."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def train_steps(eng, batches) -> dict:
    """Feed ``batches`` through a DeepSpeed engine (backward + step per micro-batch); its fp32 master state after."""
    import torch
    from modasm import engine as ds
    dtype = ds.input_dtype(eng)
    for x, y in batches:
        eng.backward(torch.nn.functional.cross_entropy(eng(x.to(dtype)).float(), y))
        eng.step()
    return ds.master_state(eng)


K4 = ["model.split=[1,1,1,1]"]


@pytest.fixture(scope="session")
def meta4(tmp_path_factory, dist_info):
    """A trained K=4 meta model of the tiny recipe (tests copy it with ``copy_meta``, never write into it)."""
    from modasm import phases
    from modasm.config import load_recipe
    out = tmp_path_factory.mktemp("meta4")
    phases.run_meta(load_recipe(TINY, [f"run.out_dir={out}", *K4]), dist_info)
    return out


@pytest.fixture(scope="session")
def incubated(tmp_path_factory, dist_info):
    """Meta model and both incubated modules of the tiny recipe, trained in this process (tests copy it)."""
    from modasm import phases
    from modasm.config import load_recipe
    out = tmp_path_factory.mktemp("incubated")
    recipe = load_recipe(TINY, [f"run.out_dir={out}"])
    phases.run_meta(recipe, dist_info)
    phases.run_incubate_all(recipe, dist_info)
    return out


def copy_meta(src: Path, dst: Path) -> Path:
    """A run directory at ``dst`` holding ``src``'s trained meta model of the tiny recipe."""
    import shutil
    shutil.copytree(src / "tiny" / "meta", dst / "tiny" / "meta")
    return dst


@pytest.fixture(autouse=True)
def _process_group_back():
    """A test that runs an entry point's ``cli.main`` in this process ends with ``dist.shutdown()``: the process
    group of the session's ``dist_info`` (a lone rank on the default group) is re-made after it, so that the
    tests after it do not depend on running before it."""
    import torch.distributed
    had = torch.distributed.is_initialized()
    yield
    if had and not torch.distributed.is_initialized():
        from modasm import dist
        dist.init()


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


def run_cmd(cmd: list[str], timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """Run a command in its own process group and capture its output. One that outlives ``timeout`` fails
    the test with its output so far, and takes its whole group along (torchrun's ranks too: killing only
    torchrun would leave them running, holding cores the next tests need)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=launch_env(**(env or {})), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(script: str, *args: str, nproc: int = 0, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """Run an entry point as a user would and capture its output."""
    return run_cmd(launch_cmd(script, *args, nproc=nproc), timeout, env)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, output=lambda: ""):
    """Poll ``condition()`` until true. Fails the test, naming ``what`` and showing ``output()``, when
    ``timeout`` seconds pass or ``proc`` exits first; never lets a caller act on a state it did not reach."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited (code {proc.returncode}) before {what}:\n{output()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s:\n{output()[-3000:]}")
        time.sleep(0.02)


# Deadlines of waits for a launched process to reach a state. Generous: on a loaded 2-core CI machine a
# torchrun launch can wait minutes for its ranks' imports (or for DeepSpeed's JIT op build lock); a wait
# that runs out fails the test, so a long one only costs time when something is wrong.
STARTUP_S = 600


@pytest.fixture
def one_thread():
    """One intra-op thread in this process, as launch_env gives launched ones: an in-process run then
    computes bit for bit what a launched process computes, so the two can be compared exactly."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_stale_stop_request():
    """A stop request (SIGUSR1 -> train.request_stop) is process-wide and stands until a training loop
    acts on it: that is what a preemption notice between two phases of one process needs. In the test
    process it would carry over into the next test's phase, so each test starts without one, and a test
    that leaves one pending fails (it would have stopped whatever ran next)."""
    train = sys.modules.get("modasm.train")  # not imported yet: nobody can have asked
    if train is not None:
        train._STOP["requested"] = False
    yield
    train = sys.modules.get("modasm.train")
    if train is not None and train._STOP["requested"]:
        train._STOP["requested"] = False
        pytest.fail("the test left a stop request pending (train.request_stop() that no loop acted on)")


def assert_export_is_master(export_dir: Path, ckpt_dir: Path, model_cfg, layout: list[int], bf16: bool) -> None:
    """The shard set holds every tensor of the engine's fp32 master weights at the exported step, exactly; under
    bf16 too (docs/method.md#precision: the fp32 masters, not the module's bf16-rounded weights: with ``bf16``
    most exported tensors must hold values bf16 cannot). The master weights come from DeepSpeed's own
    zero_to_fp32 reading the phase's final resume checkpoint (same step; every ZeRO partition gathered), not
    from the export path."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from modasm import model as M
    from modasm.engine import complete_steps, tag
    from modasm.shards import load_modules, read_manifest
    manifest = read_manifest(export_dir)
    step = manifest["step"]
    assert complete_steps(ckpt_dir)[-1] == step, f"no resume checkpoint at the exported step {step}"
    master = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag(step))
    modules = [e["index"] for e in manifest["modules"]]
    got, _ = load_modules(export_dir, model_cfg=model_cfg, modules=modules)
    names, beyond_bf16 = set(), 0
    for m in modules:
        for local, v in got[m].items():
            name = M.global_name(local, layout, m)
            names.add(name)
            want = master[name].float()
            assert v.dtype == torch.float32, f"module {m} {local} exported as {v.dtype}"
            same = torch.equal(v, want)
            assert same, f"module {m} {local}: exported != master, max |diff| {(v - want).abs().max().item():.3g}"
            beyond_bf16 += not torch.equal(v, v.bfloat16().float())
    assert names == set(master), f"not exported: {sorted(set(master) - names)[:5]}"
    if bf16:  # the fp32 masters, not bf16-rounded copies
        assert beyond_bf16 >= len(names) // 2, f"only {beyond_bf16} of {len(names)} tensors hold non-bf16 values"


def adam_moves_at_most(lr: float, steps: int, betas: tuple = (0.9, 0.999)) -> float:
    """The most ``steps`` steps of Adam(W) without weight decay at learning rates <= ``lr`` can move one element,
    whatever its gradients: sum over t of lr x max |m_hat_t| / sqrt(v_hat_t). By Cauchy-Schwarz over the moments'
    exponential sums, |m_hat_t| / sqrt(v_hat_t) <= (1 - b1) / (1 - b1^t) x sqrt((1 - b2^t) / (1 - b2)) x
    sqrt(sum_{j<t} (b1^2 / b2)^j): 1 at t = 1, 1.03 at t = 8 for betas 0.9 / 0.999 (eps only makes it smaller)."""
    b1, b2 = betas
    return lr * sum((1 - b1) / (1 - b1 ** t) * ((1 - b2 ** t) / (1 - b2)) ** 0.5
                    * sum((b1 * b1 / b2) ** j for j in range(t)) ** 0.5 for t in range(1, steps + 1))


def key_bias_rows(name: str, t) -> slice | None:
    """The key part of an attention's qkv bias (rows D..2D of ``*.attn.qkv.bias``), else None. Softmax ignores a
    bias added to every key (q.(k_j + b) shifts all of a query's scores by q.b), so its exact gradient is 0 and
    what it gets is rounding noise: Adam's m / sqrt(v) turns that noise into moves of up to lr a step, different
    in two runs that round differently (other thread counts, ranks, compiled kernels)."""
    if not name.endswith("attn.qkv.bias"):
        return None
    d = t.shape[0] // 3
    return slice(d, 2 * d)


def assert_same_training(a: dict, b: dict, atol: float, lr: float, steps: int, what: str = "") -> None:
    """Two runs' weights after the same ``steps`` AdamW steps that differ only in rounding: within ``atol`` (the
    caller derives it from the rounding), except the key part of qkv biases, whose moves are rounding noise made
    lr-sized by Adam: within what the two runs can move them apart, 2 x adam_moves_at_most(lr, steps)."""
    import torch
    assert a.keys() == b.keys(), what
    noise = 2 * adam_moves_at_most(lr, steps)
    for n in a:
        rows = key_bias_rows(n, a[n])
        if rows is None:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=atol, msg=lambda m: f"{what} {n}: {m}")
            continue
        keep = torch.ones(a[n].shape[0], dtype=torch.bool)
        keep[rows] = False
        torch.testing.assert_close(b[n][keep], a[n][keep], rtol=0, atol=atol,
                                   msg=lambda m: f"{what} {n}, query/value rows: {m}")
        torch.testing.assert_close(b[n][rows], a[n][rows], rtol=0, atol=noise,
                                   msg=lambda m: f"{what} {n}, key rows (rounding noise, <= {noise:.3g}): {m}")
