"""Training-step throughput of a recipe's phases on this machine: synthetic batches, the real model and engine.

    python launch/bench.py RECIPE --phase meta|incubate|assemble|e2e [--module k] [--sweep] [a.b=c ...]
--phase and --module take comma lists (--phase meta,incubate,assemble --module 0,-1: k=0 and k=K-1).
--sweep: micro-batch (half, the recipe's, double) x compile x checkpointing. Prints img/s, TFLOP/s, MFU and
peak memory per rank; --json FILE appends the rows (launch/estimate.py --measured FILE reads them).
"""
from modasm import bench, cli, dist


def add(p):
    p.add_argument("--phase", required=True, help="meta, incubate, assemble, e2e (comma list)")
    p.add_argument("--module", default="0", help="incubated module(s) k, comma list; -1 = K-1 (default 0)")
    p.add_argument("--sweep", action="store_true", help="micro-batch x compile x checkpointing")
    p.add_argument("--micro", help="micro-batch(es) per rank, comma list (default: the recipe's)")
    for flag in ("compile", "checkpointing"):
        p.add_argument(f"--{flag}", choices=["recipe", "on", "off", "both"], default="recipe")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="append the results to this JSON file")
    p.add_argument("--deadline", type=float, help="unix time after which configurations are skipped")


def run():
    info = dist.init()
    echo = (lambda line: print(line, flush=True)) if info.is_main else None  # each row as it is measured
    results = bench.run(recipe, info, args.phase.split(","), [int(m) for m in args.module.split(",")],
                        [int(m) for m in args.micro.split(",")] if args.micro else None, args.compile,
                        args.checkpointing, args.sweep, args.steps, args.warmup, args.json, args.deadline, args.recipe,
                        echo)
    if bench.failed(results):
        raise SystemExit(1)


if __name__ == "__main__":
    args, recipe = cli.parse(__doc__, add)
    cli.main(run)
