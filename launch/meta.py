"""Phase 1: pre-train the meta model (one block per module).  python launch/meta.py RECIPE [a.b=c ...]"""
from modasm import cli, dist, phases

args, recipe = cli.parse(__doc__)
cli.main(lambda: phases.run_meta(recipe, dist.init()))
