"""Training throughput of our CNN (forward + backward + optimizer steps, images/s) by number
format, memory layout, width and batch size: the measurements behind the recipe's CPU settings.
With --evaluation, the test-set evaluation's throughput by batch size instead (DEVICE_DEFAULTS["cpu"]["eval_batch"]).

    python bench/throughput.py > bench/throughput_cpu_2core.txt
    python bench/throughput.py --evaluation > bench/evaluation_cpu_2core.txt
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def images_per_second(widths, batch_size, channels_last, dtype, steps=6, warmup=2):
    """Training steps of the shipped recipe (Muon and SGD) on random data, timed after `warmup`."""
    device = torch.device("cpu")
    recipe = dataclasses.replace(C.recipe_for(device, batch_size, steps + warmup, "accurate"), widths=widths)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    run = C.Run((images, torch.randint(0, 10, (batch_size,), generator=generator)), 0, recipe, device, dtype)
    x, y = next(run.loader.epoch(0))
    if not channels_last:
        run.model = run.model.to(memory_format=torch.contiguous_format)
        x = x.contiguous()
    return batch_size / C.seconds_per_step(run, [(x, y)] * (steps + warmup), warmup)


def evaluation_images_per_second(batch_size, images=2000):
    """C.evaluate's forward pass during training (each image and its mirror) in batches of batch_size."""
    torch.manual_seed(0)
    model = C.ViewAverage(C.build_cnn(dtype=C.choose_format(torch.device("cpu"), "auto")[0]), 2).eval()
    x = torch.rand(images, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x[:batch_size])  # one untimed batch first
        start = time.perf_counter()
        for i in range(0, images, batch_size):
            model(x[i:i + batch_size])
    return images / (time.perf_counter() - start)


def print_evaluation_table():
    print(f"{'eval batch':>10s} {'images/s':>9s} {'s per 10,000 test images':>25s}")
    for batch in (32, 64, 128, 256, 1000):
        rate = evaluation_images_per_second(batch)
        print(f"{batch:10d} {rate:9.0f} {10000 / rate:25.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evaluation", action="store_true", help="time evaluation by batch size instead")
    args = parser.parse_args()
    machine = C.machine_description(torch.device("cpu"), torch.float32)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"bfloat16 flags {machine['cpu_bfloat16_flags']}")
    if args.evaluation:
        print_evaluation_table()
        return
    print(f"{'widths':<15s} {'batch':>5s} {'layout':<14s} {'format':<8s} {'images/s':>9s}")
    widths = C.PRESETS["accurate"].widths
    configs = [(widths, 256, cl, dtype) for cl in (False, True) for dtype in (torch.float32, torch.bfloat16)]
    configs += [(widths, b, True, torch.bfloat16) for b in (512, 1024)]
    configs += [(w, 256, True, torch.bfloat16) for w in [(32, 64, 128), (64, 192, 256), (64, 256, 256)]]
    for w, batch, cl, dtype in configs:
        rate = images_per_second(w, batch, cl, dtype)
        print(f"{str(w):<15s} {batch:5d} {'channels_last' if cl else 'NCHW':<14s} "
              f"{C.precision_name(dtype):<8s} {rate:9.0f}", flush=True)


if __name__ == "__main__":
    main()
