"""Print the comparison table of a run directory (meta, hybrids, assembled, E2E: accuracy, cost).

    python launch/report.py runs/demo-fmnist
"""
import argparse

from modasm.report import collect, table

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("run_dir")
print(table(collect(p.parse_args().run_dir)))
