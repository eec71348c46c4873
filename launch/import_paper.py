"""Import a checkpoint of the paper's code (LeapLabTHU/Model-Assembling) as a phase's shard set.

    python launch/import_paper.py RECIPE FILE --as meta                     then: launch/incubate.py RECIPE
    python launch/import_paper.py RECIPE FILE --as incubate --module k      (each k) then: launch/assemble.py RECIPE
    python launch/import_paper.py RECIPE FILE --as assemble                 then: launch/evaluate.py RECIPE
FILE is read with torch.load(weights_only=True) (a file that needs code is refused); its tensors must fit
the recipe's model. Overrides (a.b=c) as for every entry point; optimizer/scheduler/scaler state is ignored.
"""
import argparse

from modasm import cli, interop
from modasm.config import load_recipe


def run(args):
    recipe = load_recipe(args.recipe, args.overrides)
    out = interop.import_paper(recipe, args.file, args.phase, args.module, force=args.force)
    print(f"[import] {args.file} -> {out} ({args.phase}"
          f"{'' if args.module is None else f' module {args.module}'}; not checkable from weights: "
          f"num_heads={recipe.model.num_heads}, norm_eps={recipe.model.norm_eps} are taken from the recipe)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML whose model the checkpoint must fit")
    p.add_argument("file", help="the paper's checkpoint (.pth: model_stages / model)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.name=from-paper")
    p.add_argument("--as", dest="phase", required=True, choices=interop.IMPORT_AS, help="the phase it is the output of")
    p.add_argument("--module", type=int, default=None, help="with --as incubate: k (the file is hybrid(k))")
    p.add_argument("--force", action="store_true", help="replace a shard set already in the phase's place")
    args = p.parse_intermixed_args()
    cli.main(lambda: run(args))
