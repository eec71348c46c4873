"""Before a long run: memory per rank, the micro-batch that fits, step time (compute + communication), device-hours.

    python launch/estimate.py RECIPE [--gpu h100-80gb] [--gpus 32] [--mfu 0.4 | --measured bench.json]
                                     [--inter-node-gbps 400] [--gpus-per-node 8]
Without --gpu/--gpus: the hardware the recipe's header names ("# Sized for: 32 x A100-80GB").
Nothing runs on a GPU: models are traced on the meta device. See modasm/estimate.py and modasm/comm.py.
"""
from modasm import cli, estimate, perf
from modasm.errors import UserError


def add(p):
    p.add_argument("--gpu", help=f"one of: {', '.join(g.key for g in perf.GPUS)}")
    p.add_argument("--gpus", type=int, help="GPUs the pipeline gets (incubation: split into module groups)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8, as slurm/*.sh): the "
                   "incubation farm's module groups split over the nodes")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the cost projection (default 0.4)")
    p.add_argument("--measured", help="launch/bench.py --json results: per-phase MFU measured on a GPU (and bus "
                   "bandwidths, GB/s, if the file has busbw_gbs: {intra, inter})")
    p.add_argument("--inter-node-gbps", type=float, help="network line rate per GPU, Gb/s (default: the GPU type's)")
    p.add_argument("--budget", type=float, help="device-hours the assembled pipeline may take: the MFU it needs")
    p.add_argument("--train-images", type=int, default=estimate.IMAGENET_TRAIN, help="per epoch (ImageNet-1K)")


def run():
    header = estimate.sized_for(args.recipe)
    if (args.gpu is None or args.gpus is None) and header is None:
        raise UserError(f"{args.recipe} names no hardware ('# Sized for: N x GPU'): pass --gpu and --gpus")
    gpus, gpu = args.gpus or header[0], args.gpu or header[1]
    text, _ = estimate.report(recipe, gpu, gpus, args.mfu, args.measured, args.train_images, budget=args.budget,
                              inter_node_gbps=args.inter_node_gbps, gpus_per_node=args.gpus_per_node)
    print(text)


if __name__ == "__main__":
    args, recipe = cli.parse(__doc__, add)
    cli.main(run)
