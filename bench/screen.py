"""Screen variants of the efficient preset against today's CNNclassify.py: each candidate
trained on the seeds given (one to screen, three to confirm), in one run on one machine, beside
today's preset as the baseline (its seeds' mean time is the ratio's base). Prints accuracy (the saved moving average, one view, evaluated
in float32), MACs and parameters (THOP), seconds per epoch and the time ratio to the baseline.

    python bench/screen.py --data-dir data --seeds 1 > bench/screen_<cpu>_cpu_2core.txt
    python bench/screen.py --data-dir data --seeds 0 1 2 --candidates shipped 1x1_b3_24ep
    python bench/screen.py --data-dir data --subset 512 --epochs 1      # a dry run, seconds

A candidate is a change of the Recipe and, where the architecture changes, a function applied
to the CNN that build_cnn returns (before conv1 is set from the data and the optimisers are
made, so Muon trains the new convs like the others).
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402


def pointwise_last_conv(model, block=2):
    """Block `block`'s second 3x3 conv as a 1x1 conv (at 3x3 pixels a 3x3 conv sees the whole
    map; the 1x1 keeps 1/9 of its weights), identity-initialised like the others."""
    old = model.blocks[block][4]
    new = nn.Conv2d(old.in_channels, old.out_channels, 1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(new.weight)
    model.blocks[block][4] = new
    return model


class Residual(nn.Module):
    """x + f(x): an identity shortcut around a block's second conv (airbench96 has them)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


def residual_blocks(model, blocks=(1, 2)):
    """Shortcuts around the second conv, BN and GELU of the blocks named."""
    for i in blocks:
        layers = list(model.blocks[i])
        model.blocks[i] = nn.Sequential(*layers[:4], Residual(nn.Sequential(*layers[4:])))
    return model


CANDIDATES = {  # name: (changes of the Recipe, change of the model or None)
    "shipped": ({}, None),
    "26ep": ({"epochs": 26}, None),
    "1x1_b3": ({}, pointwise_last_conv),
    "1x1_b3_24ep": ({"epochs": 24}, pointwise_last_conv),
    "residual_b23": ({}, residual_blocks),
    "ema_0.99": ({"average_decay": 0.99}, None),
    "smoothing_0.1": ({"label_smoothing": 0.1}, None),
    "zca_eps_1e-3": ({"whitening_eps": 1e-3}, None),
    "w32_128_96_1x1_b3_24ep": ({"widths": (32, 128, 96), "epochs": 24}, pointwise_last_conv),
    # under ResNet-20's 272,474 parameters (225,472; 24.6 M MACs), more epochs for the width
    "w32_96_96_1x1_b3_26ep": ({"widths": (32, 96, 96), "epochs": 26}, pointwise_last_conv),
}


def train_candidate(data, name, seed, device, dtype, epochs=None):
    """Train one candidate on one seed: (the model, its history)."""
    changes, change_model = CANDIDATES[name]
    recipe = dataclasses.replace(C.recipe_for(device, preset="efficient"), **changes)
    recipe = dataclasses.replace(recipe, epochs=epochs or recipe.epochs)
    build = C.build_cnn
    if change_model:  # train_seed builds its model through C.build_cnn: changed for this run
        C.build_cnn = lambda *args, **kwargs: change_model(build(*args, **kwargs))
    try:
        model, history, _ = C.train_seed(data, seed, recipe, device, dtype)
    finally:
        C.build_cnn = build
    return model, history


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--subset", type=int, default=0, help="first N images (a dry run)")
    parser.add_argument("--epochs", type=int, help="override every candidate's epochs (dry run)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = C.pick_device()
    dtype = C.training_format(device, "auto")[0]
    data = C.take_subset(C.load_cifar(args.data_dir), args.subset)
    machine = C.machine_description(device, dtype)
    print(f"machine: {machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} threads, "
          f"torch {machine['torch']}, training in {C.precision_name(dtype)}; seeds "
          f"{' '.join(map(str, args.seeds))}; accuracy: the saved average, one view, float32",
          flush=True)
    names = ["shipped"] + [n for n in args.candidates if n != "shipped"]  # the baseline first
    print(f"{'candidate':<24s} {'seed':>4s} {'test acc':>8s} {'MACs':>11s} {'params':>8s} "
          f"{'s/epoch':>7s} {'time ratio':>10s}", flush=True)
    rows = []
    for name in names:
        for seed in args.seeds:
            model, history = train_candidate(data, name, seed, device, dtype, args.epochs)
            model = C.ViewAverage(model.float(), 1)
            model.cnn.compute_dtype = torch.float32
            right = C.evaluate(model, *data["test"], C.eval_batch(torch.device("cpu")))[1]
            macs, params = C.count_costs(model.cnn)
            seconds = history[-1]["seconds"]  # the whole seed: training and evaluations
            base = [r["seconds"] for r in rows if r["candidate"] == "shipped"] or [seconds]
            rows.append({"candidate": name, "seed": seed, "epochs": len(history), "macs": macs,
                         "params": params, "test_accuracy": 100 * right / len(data["test"][1]),
                         "seconds": seconds, "s_per_epoch": seconds / len(history),
                         "time_ratio": seconds / np.mean(base)})
            print(f"{name:<24s} {seed:4d} {rows[-1]['test_accuracy']:7.2f}% {macs:11,d} "
                  f"{params:8,d} {seconds / len(history):7.1f} {rows[-1]['time_ratio']:9.2f}x",
                  flush=True)
    if args.json:
        C.write_json(args.json, {"machine": machine, "seeds": args.seeds, "rows": rows})


if __name__ == "__main__":
    main()
