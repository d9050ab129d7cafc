"""Candidate recipes against today's at equal training compute (issue: the recipe at the anchor's
level): each candidate trains the given seeds for the epochs that keep its forward MACs of one
view x epochs within 1.05x of today's 65.16 M x 15 (THOP), on this machine one after another;
test accuracy (flip TTA, what `train` reports) and seconds, evaluation included.

    python bench/recipe.py --data-dir ../shared/cifar10 --seeds 0 > bench/recipe_cpu_2core.txt
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

CANDIDATES = {  # name: (changes to the recipe, epochs)
    "today (64/128/256)": ({}, 15),
    "widths 64/192/256": ({"widths": (64, 192, 256)}, 11),
    "widths 64/256/256": ({"widths": (64, 256, 256)}, 8),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, how = C.training_format(device, "auto", C.recipe_for(device))
    machine = C.machine_description(device, dtype)
    data = C.load_cifar(args.data_dir)
    today = C.count_costs(C.build_cnn())[0] * C.RECIPE.epochs
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)} ({how}); seeds {' '.join(map(str, args.seeds))}", flush=True)
    print(f"{'recipe':<22s} {'epochs':>6s} {'compute':>8s} {'test acc per seed':>22s} {'mean':>7s} {'s per seed':>10s}")
    for name in args.candidates:
        changes, epochs = CANDIDATES[name]
        recipe = dataclasses.replace(C.recipe_for(device, epochs=epochs), **changes)
        compute = C.count_costs(C.build_cnn(recipe))[0] * epochs / today
        runs = [C.train_seed(data, seed, recipe, device, dtype)[1:] for seed in args.seeds]
        accuracies = [history[-1]["test_accuracy"] for history, _ in runs]
        seconds = np.mean([s for _, s in runs])
        print(f"{name:<22s} {epochs:6d} {compute:7.2f}x {' '.join(f'{a:.2f}' for a in accuracies):>22s} "
              f"{np.mean(accuracies):6.2f}% {seconds:10.1f}", flush=True)


if __name__ == "__main__":
    main()
