"""Phase 3: assemble the K incubated modules and fine-tune end to end (DeepSpeed).

    python launch/assemble.py RECIPE [a.b=c ...]      or    torchrun --nproc-per-node=N launch/assemble.py RECIPE
"""
from modasm import cli

if __name__ == "__main__":
    cli.phase_main(__doc__, "assemble")
