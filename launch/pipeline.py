"""The whole method in one process: meta -> incubate K -> assemble + fine-tune -> E2E -> table + report.

    python launch/pipeline.py recipes/demo-fmnist.yaml [a.b=c ...] [--phases meta,incubate,assemble,e2e]
Each phase still hands off through its shard set on disk; re-running skips finished phases. --phases runs only
those (e.g. --phases e2e: the baseline alone).
"""
from modasm import cli


def extra(p):
    p.add_argument("--phases", default="meta,incubate,assemble,e2e",
                   help="comma-separated phases to run, in pipeline order (default: all)")


def run(recipe, only):
    from modasm import dist, phases
    from modasm.report import collect, table, write_report
    info = dist.init()
    phases.run_pipeline(recipe, info, only)
    if info.is_main:
        print("\n" + table(collect(recipe.run_dir)), flush=True)
        print(f"\nreport with plots: {write_report(recipe.run_dir)}", flush=True)


if __name__ == "__main__":
    args, recipe = cli.parse(__doc__, extra)
    cli.main(lambda: run(recipe, cli.phase_list(args.phases)))
