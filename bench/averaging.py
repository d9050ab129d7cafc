"""What the weight averaging buys: test accuracy per epoch of the trained weights themselves
against their moving average (the model `train` evaluates and saves), same seed.

The average never feeds back into training, so a run with average_decay 0 (the "average" is
then a copy of the trained weights) follows exactly the trajectory of the shipped run of the
same seed. This script makes that run and prints it beside the per-epoch history recorded in
model/results.json.

    python bench/averaging.py --data-dir ../shared/cifar10 > bench/averaging_cpu_2core.txt
"""
import argparse
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    recorded = json.loads((C.MODEL_DIR / C.RESULTS_FILE).read_text())
    run = next(r for r in recorded["runs"] if r["seed"] == args.seed)
    averaged = run["history"]
    hyp = dict(C.HYPERPARAMETERS, average_decay=0.0)
    _, trained, _ = C.train_one_seed(C.load_cifar(args.data_dir), args.seed,
                                     Namespace(device="cpu", subset=0, epochs=len(averaged)), hyp)
    machine = C.machine_description(torch.device("cpu"))
    print(f"\nmachine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}; "
          f"seed {args.seed}, average decay {C.HYPERPARAMETERS['average_decay']}")
    print(f"{'epoch':>5s} {'trained weights':>16s} {'moving average':>15s}")
    for t, a in zip(trained, averaged):
        print(f"{t['epoch']:5d} {t['test_accuracy']:15.2f}% {a['test_accuracy']:14.2f}%")


if __name__ == "__main__":
    main()
