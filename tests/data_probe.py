"""Run under torchrun by tests/test_data_imagenet.py: what each rank's loaders deliver, written as JSON.

python -m torch.distributed.run --nproc-per-node=2 tests/data_probe.py TREE SHARDS OUT WORKERS
"""
import json
import sys
from pathlib import Path

from modasm import dist
from modasm import model as M
from modasm.config import AugConfig, DataConfig, ModelConfig
from modasm.data import build_datasets, eval_loader, train_loader
from modasm.train import evaluate

MICRO, RESUME_AT = 3, 3  # resume after 3 micro-batches: not a multiple of the 2 workers


def batches(loader):
    return [(b.keys, float(b.x.double().sum())) for b in loader]


def probe(source: str, root: str, workers: int, info) -> dict:
    cfg = DataConfig(source=source, root=root, num_workers=workers, stream_splits=4, shuffle_buffer=16)
    train, val = build_datasets(cfg, 32, 0, AugConfig(rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25))
    loader = train_loader(train, MICRO, info.rank, info.world, workers)
    rec = {"n_train": len(train), "epochs": []}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        rec["epochs"].append(batches(loader))
    train.set_epoch(0, start=RESUME_AT * MICRO)
    rec["resume"] = batches(loader)
    rec["eval"] = [k for b in eval_loader(val, 4, info.rank, info.world, workers) for k in b.keys]
    model = M.build_target(ModelConfig(embed_dim=32, num_heads=2, patch_size=16, img_size=32, num_classes=4, split=[1]))
    rec["evaluate"] = evaluate(model, eval_loader(val, 4, info.rank, info.world, workers), info)
    return rec


if __name__ == "__main__":
    tree, shards, out, workers = sys.argv[1:5]
    info = dist.init()
    rec = {"imagefolder": probe("imagefolder", tree, int(workers), info),
           "webdataset": probe("webdataset", shards, int(workers), info)}
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(rec))
    dist.shutdown()
