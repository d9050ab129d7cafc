"""Seed-0 runs of recipe variants on a GPU: what batch size, epochs and widths give there,
for choosing DEVICE_DEFAULTS["gpu"] (run by bench/gpu_check.sh).

    python bench/gpu_sweep.py --data-dir /tmp/cifar10 [--device cuda]
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=0, help="first N images only (a quick check of this script)")
    args = parser.parse_args()
    device = C.pick_device(args.device)
    data = C.take_subset(C.load_cifar(args.data_dir), args.subset)
    dtype, how = C.training_format(device, "auto", C.recipe_for(device))
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {C.precision_name(dtype)} "
          f"({how}); seed {args.seed}", flush=True)
    print(f"{'variant':<32s} {'test acc':>8s} {'train s':>8s} {'wall s':>7s}", flush=True)
    for name, change in VARIANTS.items():
        recipe = dataclasses.replace(C.recipe_for(device), **change)
        start = time.perf_counter()
        _, history, seconds = C.train_seed(data, args.seed, recipe, device, dtype)
        print(f"{name:<32s} {history[-1]['test_accuracy']:7.2f}% {seconds:8.2f} {time.perf_counter() - start:7.2f}",
              flush=True)


if __name__ == "__main__":
    main()
