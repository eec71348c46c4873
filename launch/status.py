"""Where a pipeline stands (done / resumable at step N / not started), per phase and module.

    python launch/status.py RECIPE [a.b=c ...]                  the table
    python launch/status.py RECIPE --require assemble           exit 1 with what is missing + how to finish it
    python launch/status.py RECIPE --get K                      one value for scripts (K, run_dir, init_from)
    python launch/status.py RECIPE --farm-nodes N --get K       ... after checking that a farm over N nodes fits
"""
import sys

from modasm import cli


def extra(p):
    p.add_argument("--require", choices=["meta", "incubate", "assemble", "e2e", "all"])
    p.add_argument("--get", choices=["K", "run_dir", "init_from"])
    p.add_argument("--farm-nodes", type=int, metavar="N", help="exit 2 unless incubation farmed over N nodes (one "
                   "torchrun per node) fits the recipe (slurm/pipeline.sh --farm-nodes, before it submits)")


if __name__ == "__main__":
    args, recipe = cli.parse(__doc__, extra)
    if args.farm_nodes is not None and not recipe.assemble.init_from:  # init_from: no incubation to farm
        from modasm import phases
        from modasm.errors import UserError
        try:
            phases.check_farm(recipe, args.farm_nodes)
        except UserError as e:
            print(f"error: --farm-nodes {args.farm_nodes}: {e}", file=sys.stderr)
            sys.exit(2)
    if args.get:
        print({"K": recipe.model.K, "run_dir": recipe.run_dir, "init_from": recipe.assemble.init_from}[args.get])
        sys.exit(0)
    from modasm import status  # after --get: that answers without importing DeepSpeed

    for label, state in status.status(recipe).items():
        print(f"{label:<14} {state}")
    if args.require and (msg := status.require(recipe, args.require, args.recipe, args.overrides)):
        print(msg, file=sys.stderr)
        sys.exit(1)
