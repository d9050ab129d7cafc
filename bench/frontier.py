"""Accuracy against training time: the default recipe with shorter schedules, one seed each.

Each run is a full schedule (warm-up and decay fitted to its epoch count), so its final
accuracy is what a user would get by asking `train --epochs E`.

    python bench/frontier.py --data-dir ../shared/cifar10 --epochs 2 4 7 > bench/frontier_cpu_2core.txt
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 4, 7])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = C.load_cifar(args.data_dir)
    device = torch.device("cpu")
    dtype, _ = C.training_format(device, "auto", C.recipe_for(device, preset="accurate"))
    rows = []
    for epochs in args.epochs:
        _, history, seconds = C.train_seed(data, args.seed, C.recipe_for(device, preset="accurate", epochs=epochs), device, dtype)
        rows.append((epochs, seconds, history[-1]["test_accuracy"]))
    machine = C.machine_description(device, dtype)
    print(f"\nmachine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)}; seed {args.seed}")
    print(f"{'epochs':>6s} {'train seconds':>14s} {'final test acc':>15s}")
    for epochs, seconds, accuracy in rows:
        print(f"{epochs:6d} {seconds:14.1f} {accuracy:14.2f}%")


if __name__ == "__main__":
    main()
