"""launch/incubate.py, watched: run under torchrun by tests/test_incubate.py. Each rank writes what its hybrids
held at their first forward and at the end, which parameters could train and which got gradients.

python -m torch.distributed.run --nproc-per-node=2 tests/incubate_probe.py OUT RECIPE [incubate.py arguments]
"""
import json
import os
import runpy
import sys
from pathlib import Path

from safetensors.torch import save_file

from spy import watch_vits

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    out, rank = Path(sys.argv[1]), int(os.environ.get("RANK", 0))
    sys.argv = [str(ROOT / "launch" / "incubate.py"), *sys.argv[2:]]
    with watch_vits() as seen:
        runpy.run_path(sys.argv[0], run_name="__main__")  # the entry point itself (its own SystemExit on errors)
    for i, w in enumerate(seen):
        final = w.final()
        save_file({**{f"start/{n}": t for n, t in w.start.items()}, **{f"final/{n}": t for n, t in final.items()}},
                  str(out / f"rank{rank}-model{i}.safetensors"))
        (out / f"rank{rank}-model{i}.json").write_text(json.dumps({
            "depth": len(w.model.blocks), "trainable": sorted(w.trainable), "graded": sorted(w.graded),
            "grads_left": sorted(w.grads_left())}))
