"""Evaluate a phase's shard set on the recipe's validation data (top-1/top-5).

    python launch/evaluate.py RECIPE [--phase assemble|e2e|meta|incubate] [--module k] [a.b=c ...]
"""
from modasm import cli


def extra(p):
    p.add_argument("--phase", default="assemble", choices=["meta", "incubate", "assemble", "e2e"])
    p.add_argument("--module", type=int, default=None, help="with --phase incubate: which hybrid")


if __name__ == "__main__":
    from modasm import dist, evaluate
    args, recipe = cli.parse(__doc__, extra)
    cli.main(lambda: evaluate.run(recipe, dist.init(), args.phase, args.module))
