"""Does torch.compile pay for training here? Images/s of the recipe's training step, eager
against torch.compile(model), both after warm-up, and the seconds the compilation took
(which a run of `train` would pay once per seed, or per process with a warm cache).

    python bench/compile.py > bench/compile_cpu_2core.txt            # this CPU
    python bench/compile.py --device cuda > bench/compile_<gpu>.txt   # in bench/gpu_check.sh
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def images_per_second(device, dtype, hyp, compiled, steps, warmup):
    """Training steps on random data; returns (images/s after warm-up, seconds of the warm-up)."""
    torch.manual_seed(0)
    model = C.build_cnn(hyp, dtype).to(device)
    optimiser = C.Optimiser(model, hyp, steps + warmup, device, dtype)
    runner = torch.compile(model) if compiled else model
    x = torch.rand(hyp["batch_size"], 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(C.CLASSES), (hyp["batch_size"],), device=device)
    start = time.perf_counter()
    C.timed_steps(runner, optimiser, [(x, y)] * warmup, device)
    warmup_seconds = time.perf_counter() - start
    times = C.timed_steps(runner, optimiser, [(x, y)] * steps, device)
    return hyp["batch_size"] * steps / sum(times), warmup_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on a CPU, 100 on a GPU)")
    args = parser.parse_args()
    device = C.pick_device(args.device)
    hyp = C.recipe(device)
    dtype, how = C.training_format(device, "auto", hyp)
    steps = args.steps or (10 if device.type == "cpu" else 100)
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} torch threads, "
          f"torch {machine['torch']}, {C.precision_name(dtype)} ({how}); batch {hyp['batch_size']}, {steps} timed steps")
    print(f"{'mode':<10s} {'images/s':>9s} {'warm-up s':>10s}")
    for compiled in (False, True):
        try:
            rate, warmup_seconds = images_per_second(device, dtype, hyp, compiled, steps, warmup=3)
            print(f"{'compiled' if compiled else 'eager':<10s} {rate:9.0f} {warmup_seconds:10.1f}", flush=True)
        except Exception as error:  # a missing compiler or backend is a result here, not a crash
            print(f"{'compiled' if compiled else 'eager':<10s} failed: {type(error).__name__}: {C.first_line(error)}")


if __name__ == "__main__":
    main()
