"""Phase 3: assemble the K incubated modules and fine-tune end to end (DeepSpeed).

    python launch/assemble.py RECIPE [a.b=c ...]      or    torchrun --nproc-per-node=N launch/assemble.py RECIPE
"""
from modasm import cli, dist, phases

args, recipe = cli.parse(__doc__)
cli.main(lambda: phases.run_assemble(recipe, dist.init()))
