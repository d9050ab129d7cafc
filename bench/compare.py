"""Our default recipe against a typical public solution, same wall-clock budget, same machine.

The baseline stands for what public solutions of the assignment do: 3 conv layers with
BatchNorm (the first one the assignment's 5x5/32) + 2 fully connected layers, Adam at lr 1e-3,
batch 64, torchvision per-image transforms (random crop with 4-pixel padding, flip) fed by a
DataLoader. Each side gets --budget seconds of training; ours runs the epochs of its recipe
that fit in the budget, as `train --budget` picks them (measured on a few steps first).

    python bench/compare.py --data-dir ../shared/cifar10 --budget 300 > bench/compare_cpu_2core.txt
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


class Baseline(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),               # 28 -> 14
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),   # 14 -> 7
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2))  # 7 -> 3
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class PerImageDataset(torch.utils.data.Dataset):
    """CIFAR-10 tensors served one PIL image at a time, as torchvision's CIFAR10 does."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def run_baseline(data, budget, seed):
    torch.manual_seed(seed)
    normalize = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_set = PerImageDataset(*data["train"], T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                                           T.ToTensor(), normalize]))
    test_set = PerImageDataset(*data["test"], T.Compose([T.ToTensor(), normalize]))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, num_workers=2)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, num_workers=2)
    model = Baseline()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    elapsed, epoch, accuracy, train_time = 0.0, 0, 0.0, 0.0
    while elapsed < budget:
        start = time.perf_counter()
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_time += time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        accuracy = 100 * correct / len(test_set)
        elapsed += time.perf_counter() - start
        epoch += 1
        print(f"baseline epoch {epoch}  test acc {accuracy:6.2f}%  {elapsed:6.1f}s", flush=True)
    return {"test_accuracy": accuracy, "epochs": epoch, "seconds": elapsed,
            "images_per_second": epoch * len(train_set) / train_time, "seconds_per_epoch": elapsed / epoch}


def run_ours(data, budget, seed):
    """What `train --budget` does: the epochs that fit in the budget, measured here first."""
    device = torch.device("cpu")
    recipe = C.recipe_for(device, preset="accurate")
    dtype, _ = C.training_format(device, "auto", recipe)
    epochs = C.epochs_within(budget, C.seconds_per_epoch(data, recipe, device, dtype)[0])
    _, history, seconds = C.train_seed(data, seed, dataclasses.replace(recipe, epochs=epochs), device, dtype)
    return {"test_accuracy": history[-1]["test_accuracy"], "epochs": epochs, "seconds": seconds,
            "images_per_second": float(np.mean([h["images_per_second"] for h in history])),
            "seconds_per_epoch": seconds / epochs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--budget", type=float, default=300, help="training seconds for each side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = C.load_cifar(args.data_dir)
    ours = run_ours(data, args.budget, args.seed)
    baseline = run_baseline(data, args.budget, args.seed)
    machine = C.machine_description(torch.device("cpu"), torch.float32)
    print(f"\nmachine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}")
    print(f"budget: {args.budget:.0f} s of training each, seed {args.seed}")
    print(f"{'recipe':<22s} {'test acc':>9s} {'epochs':>6s} {'seconds':>8s} {'images/s':>9s} {'s/epoch':>8s}")
    for name, r in [("ours (default recipe)", ours), ("baseline (typical)", baseline)]:
        print(f"{name:<22s} {r['test_accuracy']:8.2f}% {r['epochs']:6d} {r['seconds']:8.1f} "
              f"{r['images_per_second']:9.0f} {r['seconds_per_epoch']:8.1f}")
    print(f"ratio ours/baseline: images/s x{ours['images_per_second'] / baseline['images_per_second']:.2f}, "
          f"test accuracy {ours['test_accuracy'] - baseline['test_accuracy']:+.2f} points")


if __name__ == "__main__":
    main()
