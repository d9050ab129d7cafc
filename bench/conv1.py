"""conv1 set from the data (ZCA + principal directions over the whole 5x5 kernel), kept fixed or
trained with Muon at its own norm: seed 0 of the efficient preset on all of CIFAR-10, in the
format `train` picks here; test accuracy at 1 and 2 views and each filter's share of absolute
weight on the outer ring of its 5x5 kernel. The two variants ran side by side, one thread each (at commit 9de4e2f, with the
trainer of 483e41d around it):

    python bench/conv1.py --data-dir ../shared/cifar10 --variant fixed --threads 1 > bench/conv1_fixed_zen4_cpu_2core.txt
    python bench/conv1.py --data-dir ../shared/cifar10 --variant trained --threads 1 > bench/conv1_trained_zen4_cpu_2core.txt
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import CNNclassify as C  # noqa: E402


def ring_shares(weight):
    """Each filter's share of its absolute weight on the outer ring of the kernel."""
    inner = torch.zeros(weight.shape[-2:], dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    return weight.abs()[..., ~inner].sum((1, 2)) / weight.abs().sum((1, 2, 3))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--variant", choices=["fixed", "trained"], default="fixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    recipe = dataclasses.replace(C.recipe_for(cpu, preset="efficient"),
                                 conv1_trained=args.variant == "trained")
    dtype = C.training_format(cpu, "auto")[0]
    data = C.load_cifar(args.data_dir)
    machine = C.machine_description(cpu, dtype)
    model, history, seconds = C.train_seed(data, args.seed, recipe, cpu, dtype)
    two = C.evaluate(C.ViewAverage(model, 2), *data["test"], C.eval_batch(cpu))[1]
    shares = ring_shares(model.conv1.weight.detach())
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, {C.precision_name(dtype)}")
    print(f"conv1 {args.variant}, efficient preset ({recipe.epochs} epochs, widths "
          f"{recipe.widths}), seed {args.seed}")
    print("test accuracy per epoch: " + " ".join(f"{h['test_accuracy']:.2f}" for h in history))
    print(f"final test accuracy: 1 view {history[-1]['test_accuracy']:.2f}%, 2 views "
          f"{100 * int(two.trace()) / int(two.sum()):.2f}%; training {seconds:.0f} s")
    print(f"conv1 outer-ring share of |weight|: min {shares.min():.1%}, median "
          f"{shares.median():.1%}, max {shares.max():.1%}")


if __name__ == "__main__":
    main()
