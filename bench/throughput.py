"""Training throughput of our CNN (forward + backward + SGD step, images/s) by number format,
memory layout, width and batch size: the measurements behind the recipe's CPU settings.
With --evaluation, the test-set evaluation's throughput by batch size instead (EVAL_BATCH).

    python bench/throughput.py | tee bench/throughput_cpu_2core.txt
    python bench/throughput.py --evaluation > bench/evaluation_cpu_2core.txt
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def images_per_second(widths, batch_size, channels_last, bfloat16, steps=6):
    torch.manual_seed(0)
    model = C.CNN(widths=widths, bfloat16=bfloat16).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = C.make_optimizer(model, C.HYPERPARAMETERS)
    x, y = torch.rand(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for step in range(steps + 2):  # two untimed steps first
        if step == 2:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch_size * steps / (time.perf_counter() - start)


def evaluation_images_per_second(batch_size, images=2000):
    """C.evaluate's forward pass (eval mode: each image and its mirror) in batches of batch_size."""
    torch.manual_seed(0)
    model = C.build_cnn().eval()
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
    machine = C.machine_description(torch.device("cpu"))
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}")
    if args.evaluation:
        print_evaluation_table()
        return
    print(f"{'widths':<15s} {'batch':>5s} {'layout':<14s} {'format':<8s} {'images/s':>9s}")
    configs = [((64, 128, 256), 256, cl, bf) for cl in (False, True) for bf in (False, True)]
    configs += [((64, 128, 256), b, True, True) for b in (512, 1024)]
    configs += [(w, 512, True, True) for w in [(32, 64, 128), (64, 192, 256), (64, 256, 256)]]
    for widths, batch, cl, bf in configs:
        rate = images_per_second(widths, batch, cl, bf)
        print(f"{str(widths):<15s} {batch:5d} {'channels_last' if cl else 'NCHW':<14s} "
              f"{'bfloat16' if bf else 'float32':<8s} {rate:9.0f}", flush=True)


if __name__ == "__main__":
    main()
