"""Phase 2: incubate modules inside the frozen meta model.

    python launch/incubate.py RECIPE [--module k] [a.b=c ...]
    torchrun --nproc-per-node=N launch/incubate.py RECIPE [incubate.groups=G]
Farm mode (no --module): the ranks form G module groups (default: as many as fit) that incubate their
share of the K modules at the same time, each group data-parallel on its own ranks; one process trains
all K in turn. Array mode (--module k, or SLURM_ARRAY_TASK_ID): all ranks train module k.
"""
import os

from modasm import cli, dist, phases

args, recipe = cli.parse(__doc__, lambda p: p.add_argument(
    "--module", type=int, default=None, help="incubate only module k (default: all; or SLURM_ARRAY_TASK_ID)"))
if args.module is None and "SLURM_ARRAY_TASK_ID" in os.environ:
    args.module = int(os.environ["SLURM_ARRAY_TASK_ID"])
cli.main(lambda: phases.run_incubate_all(recipe, dist.init(), args.module))
