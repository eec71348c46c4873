"""Baseline: train the target ViT end to end from scratch, same loop, data and DeepSpeed path.

    python launch/e2e.py RECIPE [a.b=c ...]
"""
from modasm import cli

if __name__ == "__main__":
    cli.phase_main(__doc__, "e2e")
