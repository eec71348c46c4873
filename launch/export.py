"""Export a trained target as a plain timm VisionTransformer (model.safetensors + config.json, HF layout).

    python launch/export.py runs/vit-b16 [--phase assemble|e2e] exported/vit-b16
then, anywhere timm is installed:  timm.create_model("local-dir:exported/vit-b16", pretrained=True)
(the exact lines, with the registered name and kwargs, are printed and written to OUT/README.md).
"""
import argparse
import sys

from modasm import interop
from modasm.errors import UserError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="runs/<run.name> (or a shard set directory itself)")
    p.add_argument("out", help="output directory (model.safetensors, config.json, README.md)")
    p.add_argument("--phase", default="assemble", choices=interop.TARGET_PHASES)
    args = p.parse_intermixed_args()
    try:
        done = interop.export_timm(args.run_dir, args.phase, args.out)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"[export] {done['out'] / 'model.safetensors'}, {done['out'] / 'config.json'}; load it with:")
    print("\n".join(f"  {line}" for line in done["lines"]))
    if done["norm_note"]:
        print(done["norm_note"])
