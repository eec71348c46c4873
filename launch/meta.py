"""Phase 1: pre-train the meta model (one block per module).  python launch/meta.py RECIPE [a.b=c ...]"""
from modasm import cli

if __name__ == "__main__":
    cli.phase_main(__doc__, "meta")
