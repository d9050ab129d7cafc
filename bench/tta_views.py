"""More test-time views than the shipped 6, scored on the three shipped models: the logits of each
test image and of every one-pixel shift of it (reflect padding), each also mirrored, combined with
the weights of each scheme below ("6 (shipped)" is ViewAverage's). Accuracy per seed and the mean.

    python bench/tta_views.py --data-dir ../shared/cifar10 > bench/tta_views_cpu_2core.txt

Verdict: at most +0.03 over the 6 views, not shipped.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

DIAGONAL = ("up-left", "down-right", "up-right", "down-left")
AXES = ("up", "down", "left", "right")
SCHEMES = {  # name: {(shift, mirrored): weight}
    "6 (shipped)": {("none", m): 1 / 4 for m in (0, 1)} | {(s, m): 1 / 8 for s in DIAGONAL[:2] for m in (0, 1)},
    "10 diag": {("none", m): 1 / 4 for m in (0, 1)} | {(s, m): 1 / 16 for s in DIAGONAL for m in (0, 1)},
    "10 diag uniform": {(s, m): 1 for s in ("none", *DIAGONAL) for m in (0, 1)},
    "18 all": {("none", m): 1 / 4 for m in (0, 1)} | {(s, m): 1 / 32 for s in DIAGONAL + AXES for m in (0, 1)},
    "10 axis": {("none", m): 1 / 4 for m in (0, 1)} | {(s, m): 1 / 16 for s in AXES for m in (0, 1)},
}


def shifted(x):
    """x and its eight one-pixel shifts, by name (reflect padding, as ViewAverage)."""
    p = F.pad(x, (1,) * 4, mode="reflect")
    return {"none": x, "up-left": p[..., :-2, :-2], "down-right": p[..., 2:, 2:], "up-right": p[..., :-2, 2:],
            "down-left": p[..., 2:, :-2], "up": p[..., :-2, 1:-1], "down": p[..., 2:, 1:-1],
            "left": p[..., 1:-1, :-2], "right": p[..., 1:-1, 2:]}


@torch.no_grad()
def logits_by_view(cnn, images, batch=500):
    """{(shift, mirrored): logits of every test image in that view}."""
    logits = {}
    for start in range(0, len(images), batch):
        x = C.to_float(images[start:start + batch]).contiguous(memory_format=torch.channels_last)
        for shift, view in shifted(x).items():
            for mirrored in (0, 1):
                logits.setdefault((shift, mirrored), []).append(cnn(view.flip(-1) if mirrored else view).float())
    return {key: torch.cat(parts) for key, parts in logits.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, _ = C.choose_format(device, "auto")
    images, labels = C.load_cifar(args.data_dir)["test"]
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)}")
    scores = {name: [] for name in SCHEMES}
    for seed in range(3):
        cnn = C.load_cnn(C.MODEL_DIR / f"cnn_seed{seed}.pt", device, dtype).cnn
        logits = logits_by_view(cnn, images)
        for name, weights in SCHEMES.items():
            combined = sum(logits[view] * weight for view, weight in weights.items())
            scores[name].append(100 * (combined.argmax(1) == labels).float().mean().item())
    for name, accuracies in scores.items():
        print(f"{name:18s}", " ".join(f"{a:.2f}" for a in accuracies), f"mean {np.mean(accuracies):.3f}", flush=True)


if __name__ == "__main__":
    main()
