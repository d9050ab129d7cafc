"""Recipes at equal training compute: each candidate trains the given seeds for the epochs that keep
its forward MACs of one view x epochs within 1.05x of the earlier recipe's (widths 64/128/256,
15 epochs: 65.16 M x 15, THOP), on this machine one after another; test accuracy with the mirror
(2 views, what `train` reported before the 6 views were shipped) and with 6 views (what `train`
reports now), and seconds per seed, every evaluation included (the final one in 6 views).

    python bench/recipe.py --data-dir ../shared/cifar10 --seeds 0 --candidates "earlier (64/128/256)" \
        "widths 64/192/256" "widths 64/256/256" > bench/recipe_candidates_cpu_2core.txt
    python bench/recipe.py --data-dir ../shared/cifar10 --seeds 0 > bench/recipe_cpu_2core.txt
    python bench/recipe.py --data-dir ../shared/cifar10 --seeds 0 1 --candidates "widths 64/240/256" \
        > bench/recipe_240_9_cpu_2core.txt
    (grep -m3 -E "^(cpu family|model|model name)" /proc/cpuinfo | sed 's/^/# /'; python bench/recipe.py \
        --data-dir ../shared/cifar10 --estimate --candidates "earlier (64/128/256)" "widths 64/256/256" \
        "widths 48/256/256") > bench/recipe_estimate_zen2_cpu_2core.txt
    (grep -m3 -E "^(cpu family|model|model name)" /proc/cpuinfo | sed 's/^/# /'; python bench/recipe.py \
        --data-dir ../shared/cifar10 --seeds 0 --candidates "widths 48/256/256") > bench/recipe_w48_zen2_cpu_2core.txt

--estimate trains nothing: it prints each candidate's seconds per seed as `train` estimates them
before its first step (C.seconds_per_epoch: timed steps and a timed evaluation, scaled), so the
time side of a comparison costs minutes on a machine where a seed takes an hour.

Outputs made before the 6 views were shipped have one accuracy per candidate: the 2-view one.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

EARLIER = ((64, 128, 256), 15)  # widths and epochs of the recipe before widths 64/256/256
CANDIDATES = {  # name: (widths, epochs)
    "earlier (64/128/256)": EARLIER,
    "widths 64/192/256": ((64, 192, 256), 11),
    "widths 64/256/256": ((64, 256, 256), 8),
    "widths 64/240/256": ((64, 240, 256), 9),
    "widths 48/256/256": ((48, 256, 256), 10),
}
SIDE_BY_SIDE = ["earlier (64/128/256)", "widths 64/256/256"]


def mirror_accuracy(model, test, batch_size):
    """Test accuracy of a trained model (train_seed's) with 2 views, the image and its mirror."""
    _, confusion = C.evaluate(C.ViewAverage(model, 2), *test, batch_size)
    return 100 * int(confusion.trace()) / len(test[1])


def print_estimates(data, candidates, steps, device, dtype, earlier):
    """Each candidate's compute and estimated seconds per seed here, and its time over the first's."""
    print(f"estimated, not trained: {steps} timed steps and 1,024 test images evaluated per candidate", flush=True)
    print(f"{'recipe':<22s} {'epochs':>6s} {'compute':>8s} {'s per epoch':>11s} {'s per seed':>10s} {'time':>6s}")
    first = None
    for name in candidates:
        widths, epochs = CANDIDATES[name]
        recipe = dataclasses.replace(C.recipe_for(device, preset="accurate", epochs=epochs), widths=widths)
        compute = C.count_costs(C.build_cnn(recipe))[0] * epochs / earlier
        epoch_seconds, setup_seconds = C.seconds_per_epoch(data, recipe, device, dtype, steps)
        seed_seconds = setup_seconds + epochs * epoch_seconds
        first = first or seed_seconds
        print(f"{name:<22s} {epochs:6d} {compute:7.2f}x {epoch_seconds:11.1f} {seed_seconds:10.1f} "
              f"{seed_seconds / first:5.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--candidates", nargs="+", default=SIDE_BY_SIDE, choices=list(CANDIDATES))
    parser.add_argument("--estimate", action="store_true", help="estimate seconds per seed; train nothing")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per candidate (--estimate)")
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, how = C.training_format(device, "auto", C.recipe_for(device, preset="accurate"))
    machine = C.machine_description(device, dtype)
    data = C.load_cifar(args.data_dir)
    earlier = C.count_costs(C.build_cnn(dataclasses.replace(C.PRESETS["accurate"], widths=EARLIER[0])))[0] * EARLIER[1]
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)} ({how}); seeds {' '.join(map(str, args.seeds))}", flush=True)
    if args.estimate:
        return print_estimates(data, args.candidates, args.steps, device, dtype, earlier)
    print(f"{'recipe':<22s} {'epochs':>6s} {'compute':>8s} {'views':>5s} {'test acc per seed':>22s} {'mean':>7s} "
          f"{'s per seed':>10s}")
    for name in args.candidates:
        widths, epochs = CANDIDATES[name]
        recipe = dataclasses.replace(C.recipe_for(device, preset="accurate", epochs=epochs), widths=widths)
        compute = C.count_costs(C.build_cnn(recipe))[0] * epochs / earlier
        runs = [C.train_seed(data, seed, recipe, device, dtype) for seed in args.seeds]
        seconds = np.mean([s for _, _, s in runs])
        mirror = [mirror_accuracy(model, data["test"], recipe.eval_batch) for model, _, _ in runs]
        for views, accuracies in [(2, mirror), (6, [history[-1]["test_accuracy"] for _, history, _ in runs])]:
            print(f"{name:<22s} {epochs:6d} {compute:7.2f}x {views:5d} {' '.join(f'{a:.2f}' for a in accuracies):>22s} "
                  f"{np.mean(accuracies):6.2f}% {seconds:10.1f}", flush=True)


if __name__ == "__main__":
    main()
