"""Baseline: train the target ViT end to end from scratch, same loop, data and DeepSpeed path.

    python launch/e2e.py RECIPE [a.b=c ...]
"""
from modasm import cli, dist, phases

args, recipe = cli.parse(__doc__)
cli.main(lambda: phases.run_e2e(recipe, dist.init()))
