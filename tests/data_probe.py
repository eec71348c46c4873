"""Run under torchrun by tests/test_data_imagenet.py: what each rank's loaders deliver, written as JSON.

python -m torch.distributed.run --nproc-per-node=2 tests/data_probe.py TREE SHARDS OUT WORKERS [BACKENDS]

BACKENDS: comma-separated data.backend values (default pil); a non-pil backend's records are keyed
``<source>-<backend>`` and its batches are finished by ``to_device`` (decoded and augmented on the CPU).
"""
import json
import sys
from pathlib import Path

from modasm import dist
from modasm import model as M
from modasm.config import AugConfig, DataConfig, ModelConfig
from modasm.data import build_datasets, eval_loader, to_device, train_loader
from modasm.train import evaluate

MICRO, RESUME_AT = 3, 3  # resume after 3 micro-batches: not a multiple of the 2 workers


def batches(loader, ds):
    return [(b.keys, float(b.x.double().sum())) for b in (to_device(ds, b, "cpu") for b in loader)]


def probe(source: str, root: str, workers: int, info, backend: str = "pil") -> dict:
    cfg = DataConfig(source=source, root=root, num_workers=workers, stream_splits=4, shuffle_buffer=16, backend=backend)
    train, val = build_datasets(cfg, 32, 0, AugConfig(rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25))
    loader = train_loader(train, MICRO, info.rank, info.world, workers)
    rec = {"n_train": len(train), "epochs": []}
    for epoch in (0, 1):
        train.set_epoch(epoch)
        rec["epochs"].append(batches(loader, train))
    train.set_epoch(0, start=RESUME_AT * MICRO)
    rec["resume"] = batches(loader, train)
    rec["eval"] = [k for b in eval_loader(val, 4, info.rank, info.world, workers) for k in b.keys]
    model = M.build_target(ModelConfig(embed_dim=32, num_heads=2, patch_size=16, img_size=32, num_classes=4, split=[1]))
    rec["evaluate"] = evaluate(model, eval_loader(val, 4, info.rank, info.world, workers), info, dataset=val)
    return rec


if __name__ == "__main__":
    tree, shards, out, workers = sys.argv[1:5]
    backends = sys.argv[5].split(",") if len(sys.argv) > 5 else ["pil"]
    info = dist.init()
    rec = {}
    for backend in backends:
        for source, root in (("imagefolder", tree), ("webdataset", shards)):
            rec[source if backend == "pil" else f"{source}-{backend}"] = probe(source, root, int(workers), info, backend)
    Path(out, f"rank{info.rank}.json").write_text(json.dumps(rec))
    dist.shutdown()
