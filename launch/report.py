"""Write a run's report (report.md + PNG plots) from its JSON lines, and print the comparison table.

    python launch/report.py runs/demo-fmnist        -> runs/demo-fmnist/report/report.md
"""
import argparse
import sys

if __name__ == "__main__":
    from modasm.errors import UserError
    from modasm.report import collect, table, write_report
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="runs/<run.name>")
    args = p.parse_args()
    try:
        path = write_report(args.run_dir)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(table(collect(args.run_dir)))
    print(f"\nreport: {path}")
