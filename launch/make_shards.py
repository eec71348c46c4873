"""ImageFolder tree -> webdataset shards + index + classes.json (resumable: re-run the same command).

  python launch/make_shards.py /datasets/imagenet /datasets/imagenet-wds --shard-size 1000
  python launch/make_shards.py --index '/data/wds/train-{000000..001281}.tar' --split train /data/wds-index
"""
import argparse
from pathlib import Path

import braceexpand

from modasm import cli
from modasm.data import wds, writer


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="ImageFolder root holding train/ and val/ (one directory per class)")
    p.add_argument("out", help="output directory: shards, <split>-index.json, classes.json (data.root of the recipe)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (ImageNet train: ~110 MB per 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that mixes classes across shards")
    p.add_argument("--threads", type=int, default=8, help="threads reading image files")
    p.add_argument("--index", metavar="PATTERN", help="instead: index existing shards (brace pattern or pipe: URL)")
    p.add_argument("--split", default="train", help="with --index: the split the shards hold (train or val)")
    return p


def run(p, args):
    if args.index:
        path = wds.index_shards(list(braceexpand.braceexpand(args.index)), args.split, Path(args.out),
                                progress=lambda i, n, k: print(f"[make_shards] indexed {i}/{n} shards, {k} samples",
                                                               flush=True))
        print(f"[make_shards] wrote {path}")
    elif not args.src:
        p.error("give SRC OUT, or --index PATTERN OUT")
    else:
        for path in writer.make_shards(args.src, args.out, args.shard_size, args.seed, args.threads):
            print(f"[make_shards] wrote {path}")


if __name__ == "__main__":
    p = parser()
    args = p.parse_args()
    cli.main(lambda: run(p, args))
