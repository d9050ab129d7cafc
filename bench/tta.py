"""Test-time augmentation: what more views of each test image buy, and what they cost.

Each model (default: the three shipped seeds, model/cnn_seed<N>.pt) scored with 1 view, with
its mirror (2 views, what training's per-epoch evaluation uses) and with airbench's 6 views
(mirror x {no shift, 1-pixel shift up-left, 1-pixel shift down-right}, the shifted pairs
weighted half as much; what `test`, `evaluate` and the final evaluation of `train` use), in the
format `auto` picks here; single-image latency of each on the first model.

    python bench/tta.py --data-dir ../shared/cifar10 > bench/tta_cpu_2core.txt
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

VIEWS = (1, 2, 6)


def with_views(model, views):
    """model (what load_cnn gives) scored over `views` views of each image."""
    return model.cnn if views == 1 else C.ViewAverage(model.cnn, views).eval()


def accuracy(model, images, labels):
    _, confusion = C.evaluate(model, images, labels, C.DEVICE_DEFAULTS["cpu"]["eval_batch"])
    return 100 * int(confusion.trace()) / len(labels)


def latency_ms(model, iterations=300):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return 1000 * float(np.median(C.time_inference(model, x, 20, iterations)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--models", nargs="+", default=[str(C.MODEL_DIR / f"cnn_seed{s}.pt") for s in range(3)])
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, _ = C.choose_format(device, "auto")
    models = [C.load_cnn(path, device, dtype) for path in args.models]
    images, labels = C.load_cifar(args.data_dir)["test"]
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)}")
    print(f"{'views':>5s} " + " ".join(f"{Path(p).name:>14s}" for p in args.models) + f" {'mean':>7s} {'ms per image':>13s}")
    for views in VIEWS:
        scores = [accuracy(with_views(model, views), images, labels) for model in models]
        print(f"{views:5d} " + " ".join(f"{a:13.2f}%" for a in scores)
              + f" {np.mean(scores):6.2f}% {latency_ms(with_views(models[0], views)):13.3f}", flush=True)


if __name__ == "__main__":
    main()
