"""Phase 2: incubate modules inside the frozen meta model.

    python launch/incubate.py RECIPE [--module k] [a.b=c ...]
    torchrun --nproc-per-node=N launch/incubate.py RECIPE [incubate.groups=G] [--part p/P]
Farm mode (no --module): the farm's ranks form G module groups (default: as many as fit) that incubate their
share of the K modules at the same time, each group data-parallel on its own ranks; one process trains all K
in turn. A farm over several nodes is one torchrun per node, each with its own rendezvous and --part p/P
(slurm/incubate.sh does it). Array mode (--module k, or SLURM_ARRAY_TASK_ID): all ranks train module k.
"""
import os

from modasm import cli


def extra(p):
    p.add_argument("--module", type=int, default=None, help="incubate only module k (default: all; or "
                   "SLURM_ARRAY_TASK_ID)")
    p.add_argument("--part", default="0/1", help="farm mode: this launch is part p of P (one per node)")


if __name__ == "__main__":
    from modasm import dist, phases
    args, recipe = cli.parse(__doc__, extra)
    if args.module is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        args.module = int(os.environ["SLURM_ARRAY_TASK_ID"])
    part = cli.fraction(args.part, "--part")
    cli.main(lambda: phases.run_incubate_all(recipe, dist.init(), args.module, part))
