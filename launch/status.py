"""Where a pipeline stands (done / resumable at step N / not started), per phase and module.

    python launch/status.py RECIPE [a.b=c ...]                  the table
    python launch/status.py RECIPE --require assemble           exit 1 with what is missing + how to finish it
    python launch/status.py RECIPE --get K                      one value for scripts (K, run_dir, init_from)
"""
import sys

from modasm import cli


def extra(p):
    p.add_argument("--require", choices=["meta", "incubate", "assemble", "e2e", "all"])
    p.add_argument("--get", choices=["K", "run_dir", "init_from"])


if __name__ == "__main__":
    args, recipe = cli.parse(__doc__, extra)
    if args.get:
        print({"K": recipe.model.K, "run_dir": recipe.run_dir, "init_from": recipe.assemble.init_from}[args.get])
        sys.exit(0)
    from modasm import status  # after --get: that answers without importing DeepSpeed

    for label, state in status.status(recipe).items():
        print(f"{label:<14} {state}")
    if args.require and (msg := status.require(recipe, args.require, args.recipe, args.overrides)):
        print(msg, file=sys.stderr)
        sys.exit(1)
