"""Recipe variants on a GPU, a few seeds each: what batch size, epochs and widths give there,
for choosing DEVICE_DEFAULTS["gpu"] and the recipe (run by bench/gpu_check.sh, which cuts it
after a while: the variants are in order of what they decide). First the open question of the
CPU benches: widths 48/256/256 for 10 epochs scored +0.06 over the shipped 64/256/256 x 8 on 4
paired seeds (bench/recipe_knobs_cpu_2core.txt, bench/recipe_w48_zen2_cpu_2core.txt) for about
1.1x the time on a bfloat16 CPU; 64/256/256 x 9 is the shipped
net given that time, so the pair says whether the narrower first block or the time bought it.

    python bench/gpu_sweep.py --data-dir /tmp/cifar10 [--device cuda] [--seeds 0 1 2]
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

VARIANTS = {  # name: changes to the GPU recipe (widths 64/256/256)
    "default (batch 1024, 8 epochs)": {},
    "48/256/256, 10 epochs": {"widths": (48, 256, 256), "epochs": 10},
    "batch 1024, 9 epochs": {"epochs": 9},
    "batch 2048": {"batch_size": 2048},
    "batch 1024, 10 epochs": {"epochs": 10},
    "batch 2048, 10 epochs": {"batch_size": 2048, "epochs": 10},
    "batch 512": {"batch_size": 512},
    "64/128/256, 15 epochs (earlier)": {"widths": (64, 128, 256), "epochs": 15},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--subset", type=int, default=0, help="first N images only (a quick check of this script)")
    args = parser.parse_args()
    device = C.pick_device(args.device)
    data = C.take_subset(C.load_cifar(args.data_dir), args.subset)
    dtype, how = C.training_format(device, "auto")
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {C.precision_name(dtype)} "
          f"({how}); seeds {' '.join(map(str, args.seeds))}", flush=True)
    print(f"{'variant':<32s} {'test acc per seed':>24s} {'mean':>7s} {'train s':>8s} {'wall s':>7s}", flush=True)
    for name, change in VARIANTS.items():
        recipe = dataclasses.replace(C.recipe_for(device, preset="accurate"), **change)
        start = time.perf_counter()
        runs = [C.train_seed(data, seed, recipe, device, dtype) for seed in args.seeds]
        accuracies = [history[-1]["test_accuracy"] for _, history, _ in runs]
        print(f"{name:<32s} {' '.join(f'{a:.2f}' for a in accuracies):>24s} {sum(accuracies) / len(runs):6.2f}% "
              f"{sum(s for _, _, s in runs) / len(runs):8.2f} {(time.perf_counter() - start) / len(runs):7.2f}",
              flush=True)


if __name__ == "__main__":
    main()
