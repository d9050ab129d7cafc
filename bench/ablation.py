"""One change at a time against the shipped recipe: accuracy and training seconds of one seed.

Each variant is HYPERPARAMETERS with the overrides below; all run the same number of epochs
on the same machine, in the number format `auto` picks there.

    python bench/ablation.py --data-dir ../shared/cifar10 --epochs 4 > bench/ablation_cpu_2core.txt
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

VARIANTS = {
    "shipped": {},
    "5x5 stem (16 directions)": {"whitening": ((5, 16),)},
    "SGD for conv filters": {"muon_lr_per_1024": 0.0},
    "no weight averaging": {"average_decay": 0.0},
    "no label smoothing": {"label_smoothing": 0.0},
    "batch 512": {"batch_size": 512},
    "widths 64/128/256 (earlier)": {"widths": (64, 128, 256)},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, _ = C.training_format(device, "auto", C.recipe_for(device, preset="accurate"))
    machine = C.machine_description(device, dtype)
    data = C.load_cifar(args.data_dir)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)}; seed {args.seed}, {args.epochs} epochs each", flush=True)
    rows = []
    for name in args.variants:
        recipe = dataclasses.replace(C.recipe_for(device, preset="accurate", epochs=args.epochs), **VARIANTS[name])
        _, history, seconds = C.train_seed(data, args.seed, recipe, device, dtype)
        rows.append((name, history[-1]["test_accuracy"], seconds))
        print(f"# {name}: {history[-1]['test_accuracy']:.2f}% in {seconds:.1f} s", flush=True)
    print(f"{'variant':<28s} {'test acc':>8s} {'seconds':>8s}")
    for name, accuracy, seconds in rows:
        print(f"{name:<28s} {accuracy:7.2f}% {seconds:8.1f}")


if __name__ == "__main__":
    main()
