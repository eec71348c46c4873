"""Run a study (one base recipe x axes; each cell an ordinary pipeline, serially) and aggregate it.

    python launch/study.py studies/fmnist-depth.yaml            run what is not finished, then the table + plots
    python launch/study.py studies/fmnist-depth.yaml --cell C   run cell C alone
    python launch/study.py studies/fmnist-depth.yaml --list     every cell and where it stands
    python launch/study.py studies/fmnist-depth.yaml --aggregate  only the table + plots, from the kept results
Re-running the same command skips finished cells and resumes an interrupted one. See modasm/study.py.
"""
import argparse
import sys

if __name__ == "__main__":
    from modasm import study
    from modasm.errors import UserError
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study file (YAML)")
    p.add_argument("--cell", help="run this cell alone")
    p.add_argument("--first", type=int, default=0, metavar="N", help="only the grid's first N cells")
    p.add_argument("--list", action="store_true", help="list the cells and their state; run nothing")
    p.add_argument("--aggregate", action="store_true", help="write the table and plots only; run nothing")
    p.add_argument("--out-dir", help="run the cells under this directory instead of the study's out_dir")
    p.add_argument("--results", help="keep the results here instead of the study's results directory")
    p.add_argument("--set", action="append", default=[], metavar="A.B=C",
                   help="an override after every cell's own (repeatable), e.g. toy sizes for a dry run")
    args = p.parse_args()
    try:
        s = study.load(args.study, out_dir=args.out_dir, results=args.results, extra=tuple(args.set))
        if args.list:
            print("\n".join(study.status_lines(s)))
        elif args.aggregate:
            print(study.write(s) or "no cell has finished yet")
        else:
            sys.exit(study.run(s, args.cell, first=args.first))
    except UserError as e:
        sys.exit(f"error: {e}")
