"""Does torch.compile pay for training here? Images/s of the recipe's training step, eager
against torch.compile(model), both after warm-up, and the seconds the compilation took
(which a run of `train` would pay once per seed, or per process with a warm cache).

    python bench/compile.py > bench/compile_cpu_2core.txt            # this CPU
    python bench/compile.py --device cuda > bench/compile_<gpu>.txt   # in bench/gpu_check.sh
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def images_per_second(device, dtype, recipe, compiled, steps, warmup):
    """Training steps (C.train_steps) on random data; returns (images/s after warm-up, seconds of the warm-up)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (recipe.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, len(C.CLASSES), (recipe.batch_size,), generator=generator)
    run = C.Run((images, labels), 0, dataclasses.replace(recipe, epochs=steps + warmup), device, dtype)
    if compiled:
        run.model = torch.compile(run.model)
    batch = next(run.loader.epoch(0))
    start = time.perf_counter()
    C.train_steps(run, [batch] * warmup)
    C.synchronize(device)
    warmup_seconds = time.perf_counter() - start
    return recipe.batch_size / C.seconds_per_step(run, [batch] * steps, 0), warmup_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on a CPU, 100 on a GPU)")
    args = parser.parse_args()
    device = C.pick_device(args.device)
    recipe = C.recipe_for(device, preset="accurate")
    dtype, how = C.training_format(device, "auto", recipe)
    steps = args.steps or (10 if device.type == "cpu" else 100)
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, {C.precision_name(dtype)} ({how}); batch {recipe.batch_size}, {steps} timed steps")
    print(f"{'mode':<10s} {'images/s':>9s} {'warm-up s':>10s}")
    for compiled in (False, True):
        try:
            rate, warmup_seconds = images_per_second(device, dtype, recipe, compiled, steps, warmup=3)
            print(f"{'compiled' if compiled else 'eager':<10s} {rate:9.0f} {warmup_seconds:10.1f}", flush=True)
        except Exception as error:  # a missing compiler or backend is a result here, not a crash
            print(f"{'compiled' if compiled else 'eager':<10s} failed: {type(error).__name__}: {C.first_line(error)}")


if __name__ == "__main__":
    main()
