"""Phase 2: incubate modules inside the frozen meta model.

    python launch/incubate.py RECIPE [--module k] [a.b=c ...]
Without --module (and without SLURM_ARRAY_TASK_ID) every module is incubated in turn.
"""
import os

from modasm import cli, dist, phases

args, recipe = cli.parse(__doc__, lambda p: p.add_argument(
    "--module", type=int, default=None, help="incubate only module k (default: all; or SLURM_ARRAY_TASK_ID)"))
if args.module is None and "SLURM_ARRAY_TASK_ID" in os.environ:
    args.module = int(os.environ["SLURM_ARRAY_TASK_ID"])
cli.main(lambda: phases.run_incubate_all(recipe, dist.init(), args.module))
