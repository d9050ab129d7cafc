"""Test-time augmentation: what more views of each test image buy, and what they cost.

The shipped model (model/cnn.pt) scored with 1 view, with its mirror (2 views, what `test` and
training's evaluation use) and with airbench's 6 views (mirror x {no shift, 1-pixel shift up-left,
1-pixel shift down-right}, the shifted pairs weighted 1/4 each); single-image latency of each
in the format `auto` picks here.

    python bench/tta.py --data-dir ../shared/cifar10 > bench/tta_cpu_2core.txt
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def logits(model, x, views):
    """Weighted mean of the logits over the views, all views in one batch (as the model's own
    eval mode does for the mirror)."""
    if views == 1:
        return model.cnn(x)
    padded = F.pad(x, (1,) * 4, mode="reflect")
    shifted = [padded[..., :-2, :-2], padded[..., 2:, 2:]] if views == 6 else []
    weights = [0.5] if views == 2 else [0.25, 0.125, 0.125]
    batch = torch.cat([v for image in [x, *shifted] for v in (image, image.flip(-1))])
    out = model.cnn(batch).view(2 * len(weights), len(x), -1)
    return sum(w * (out[2 * i] + out[2 * i + 1]) for i, w in enumerate(weights))


@torch.inference_mode()
def accuracy(model, images, labels, views):
    correct = 0
    batch = C.DEVICE_DEFAULTS["cpu"]["eval_batch"]
    for start in range(0, len(images), batch):
        x = C.to_float(images[start:start + batch]).contiguous(memory_format=torch.channels_last)
        correct += (logits(model, x, views).argmax(1) == labels[start:start + batch]).sum().item()
    return 100 * correct / len(images)


@torch.inference_mode()
def latency_ms(model, views, iterations=300):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        logits(model, x, views)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        logits(model, x, views)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, _ = C.choose_format(device, "auto")
    model = C.load_cnn(device=device, dtype=dtype)
    images, labels = C.load_cifar(args.data_dir)["test"]
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(model.cnn.compute_dtype)}; model/cnn.pt")
    print(f"{'views':>5s} {'test acc':>9s} {'median ms per image':>20s}")
    for views in (1, 2, 6):
        print(f"{views:5d} {accuracy(model, images, labels, views):8.2f}% {latency_ms(model, views):20.3f}", flush=True)


if __name__ == "__main__":
    main()
