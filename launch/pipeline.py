"""The whole method in one process: meta -> incubate K -> assemble + fine-tune -> E2E -> table + report.

    python launch/pipeline.py recipes/demo-fmnist.yaml [a.b=c ...]
Each phase still hands off through its shard set on disk; re-running skips finished phases.
"""
from modasm import cli


def run(recipe):
    from modasm import dist, phases
    from modasm.report import collect, table, write_report
    info = dist.init()
    phases.run_pipeline(recipe, info)
    if info.is_main:
        print("\n" + table(collect(recipe.run_dir)), flush=True)
        print(f"\nreport with plots: {write_report(recipe.run_dir)}", flush=True)


if __name__ == "__main__":
    args, recipe = cli.parse(__doc__)
    cli.main(lambda: run(recipe))
