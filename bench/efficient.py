"""Small recipes against the pretrained ResNet-20 on accuracy, MACs and latency at once.

Each candidate is the default recipe with other widths and epochs. `--train` trains the given
seeds of each at full length, one after another, and scores the saved moving average on the
10,000 test images with 1, 2 and 6 test-time views; every run is added to the JSON file (`--out`),
which report/build.py draws the frontier from. `--costs` trains nothing: THOP MACs and params of
one view, batch-1 latency of one view in float32 and in the training format beside ResNet-20's
in the same process, and each candidate's seconds per seed as `train` estimates them, beside
the accurate recipe's; run it with nothing else on the machine.

    python bench/efficient.py --data-dir ../shared/cifar10 --train --candidates w32-144-144x20 \
        w24-160-160x20 w32-128-192x20 --seeds 0 > bench/efficient_train_zen5_cpu_2core.txt  # third cut short
    python bench/efficient.py --data-dir ../shared/cifar10 --candidates "accurate 64/256/256x8" \
        --score model/cnn_seed0.pt model/cnn_seed1.pt model/cnn_seed2.pt \
        > bench/efficient_score_zen5_cpu_2core.txt     # the accurate models, before model/ was retrained
    python CNNclassify.py train --seeds 0 1 2 --data-dir ../shared/cifar10 > model/train_log.txt
    python bench/efficient.py --data-dir ../shared/cifar10 --candidates w32-144-144x20 \
        --score model/cnn_seed0.pt model/cnn_seed1.pt model/cnn_seed2.pt \
        > bench/efficient_score_shipped_zen5_cpu_2core.txt
    python bench/efficient.py --data-dir ../shared/cifar10 --costs --candidates "accurate 64/256/256x8" \
        w32-144-144x20 w24-160-160x20 > bench/efficient_costs_zen5_cpu_2core.txt
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/efficient.py --data-dir ../shared/cifar10 --costs --candidates \
        "accurate 64/256/256x8" w32-144-144x20 --costs-out bench/efficient_costs_avx2.json \
        > bench/efficient_costs_avx2_zen5_cpu_2core.txt
    python bench/efficient.py --data-dir ../shared/cifar10 --train --candidates "accurate 64/256/256x8" \
        --seeds 0 > bench/efficient_train_accurate_zen5_cpu_2core.txt   # its time beside the efficient seeds
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

CANDIDATES = {  # name: (widths, epochs)
    "accurate 64/256/256x8": ((64, 256, 256), 8),
    "w40-128-128x20": ((40, 128, 128), 20),
    "w32-144-144x20": ((32, 144, 144), 20),
    "w24-160-160x20": ((24, 160, 160), 20),
    "w32-128-192x20": ((32, 128, 192), 20),
}
OUT = Path(__file__).resolve().parent / "efficient_results.json"


def recipe_of(name, device):
    widths, epochs = CANDIDATES[name]
    return dataclasses.replace(C.recipe_for(device, preset="accurate", epochs=epochs), widths=widths)


def add_run(path, run):
    """Add (or replace) one run in the JSON file, read just before writing."""
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = [r for r in runs if (r["candidate"], r["seed"]) != (run["candidate"], run["seed"])]
    C.write_json(path, runs + [run])


def accuracy(model, test, batch_size):
    _, confusion = C.evaluate(model, *test, batch_size)
    return 100 * int(confusion.trace()) / len(test[1])


def cpu_line(device, dtype):
    m = C.machine_description(device, dtype)
    return (f"machine: {m['cpu']}, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}, training in {C.precision_name(dtype)}")


def score(args, device, dtype):
    """Add trained checkpoints (cnn_seed<N>.pt of `train`) to --out as runs of --candidates[0]."""
    test = C.load_cifar(args.data_dir)["test"]
    name = args.candidates[0]
    for path in args.score:
        checkpoint = C.load_torch_file(path, f"{path}: no such model")
        model = C.load_cnn(path, device, checkpoint["precision"]).cnn
        scores = {views: accuracy(C.ViewAverage(model, views), test, 64) for views in (1, 2, 6)}
        print(f"{name:<22s} {checkpoint['seed']:4d} {scores[1]:6.2f}% {scores[2]:6.2f}% {scores[6]:6.2f}% "
              f"{checkpoint['train_seconds']:10.1f}  ({path}, trained in {checkpoint['precision']})", flush=True)
        add_run(args.out, {"candidate": name, "widths": checkpoint["settings"]["widths"],
                     "epochs": len(checkpoint["history"]), "seed": checkpoint["seed"],
                     "accuracy_by_views": {str(v): a for v, a in scores.items()},
                     "train_seconds": checkpoint["train_seconds"], "scored_from": str(path)})


def train(args, device, dtype):
    data = C.load_cifar(args.data_dir)
    test = data["test"]
    print(f"{'candidate':<22s} {'seed':>4s} {'1 view':>7s} {'2 views':>7s} {'6 views':>7s} {'s per seed':>10s}",
          flush=True)
    for name in args.candidates:
        recipe = recipe_of(name, device)
        for seed in args.seeds:
            model, history, seconds = C.train_seed(data, seed, recipe, device, dtype)
            scores = {views: accuracy(C.ViewAverage(model, views) if views > 1 else model, test, recipe.eval_batch)
                      for views in (1, 2, 6)}
            print(f"{name:<22s} {seed:4d} {scores[1]:6.2f}% {scores[2]:6.2f}% {scores[6]:6.2f}% {seconds:10.1f}",
                  flush=True)
            add_run(args.out, {"candidate": name, "widths": list(recipe.widths), "epochs": recipe.epochs, "seed": seed,
                         "accuracy_by_views": {str(v): a for v, a in scores.items()}, "train_seconds": seconds,
                         "machine": C.machine_description(device, dtype)})


def latency_ms(model, x, args):
    return float(1000 * C.time_inference(model.eval(), x, args.warmup, args.iterations).mean())


def costs(args, device, dtype):
    """MACs, params, batch-1 latency at 1, 2 and 6 views (float32 and the training format) and
    estimated seconds per seed of each candidate, beside both ResNet-20s; printed and saved."""
    data = C.load_cifar(args.data_dir)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    record = {"command": "python " + " ".join(sys.argv), "machine": C.machine_description(device, dtype),
              "candidates": []}
    for option in ("A", "B"):
        resnet = C.ResNet20(option, C.CIFAR_MEAN, C.CIFAR_STD)
        record[f"resnet20_option{option}_ms"] = latency_ms(resnet, x, args)
        macs, params = C.count_costs(resnet)
        print(f"ResNet-20 option {option}: {macs:,d} MACs, {params:,d} params, "
              f"{record[f'resnet20_option{option}_ms']:.3f} ms (float32, batch 1)", flush=True)
    formats = list(dict.fromkeys([torch.float32, dtype]))
    print(f"{'candidate':<22s} {'MACs/view':>11s} {'params':>9s} "
          + " ".join(f"{'ms ' + C.precision_name(f) + ' 1/2/6 views':>28s}" for f in formats)
          + f" {'s per seed':>10s} {'time':>6s}", flush=True)
    first = None
    for name in args.candidates:
        recipe = recipe_of(name, device)
        macs, params = C.count_costs(C.build_cnn(recipe))
        row = {"candidate": name, "widths": list(recipe.widths), "epochs": recipe.epochs, "macs": macs,
               "params": params}
        for fmt in formats:
            cnn = C.build_cnn(recipe, fmt).eval()
            row[f"ms_{C.precision_name(fmt)}"] = {str(v): latency_ms(C.ViewAverage(cnn, v), x, args) for v in (1, 2, 6)}
        epoch_seconds, setup_seconds = C.seconds_per_epoch(data, recipe, device, dtype, args.steps)
        row["seconds_per_seed"] = setup_seconds + recipe.epochs * epoch_seconds
        first = first or row["seconds_per_seed"]
        record["candidates"].append(row)
        print(f"{name:<22s} {macs:11,d} {params:9,d} " + " ".join(
            f"{'/'.join(f'{t:.3f}' for t in row['ms_' + C.precision_name(f)].values()):>28s}" for f in formats)
              + f" {row['seconds_per_seed']:10.1f} {row['seconds_per_seed'] / first:5.2f}x", flush=True)
    C.write_json(args.costs_out, record)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train", action="store_true", help="train and score the candidates")
    parser.add_argument("--costs", action="store_true", help="MACs, params, latency and time estimates")
    parser.add_argument("--score", nargs="+", type=Path, help="score these trained checkpoints instead")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--costs-out", type=Path, default=OUT.with_name("efficient_costs.json"))
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per candidate (--costs)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, _ = C.training_format(device, "auto", C.recipe_for(device, preset="accurate"))
    print(cpu_line(device, dtype), flush=True)
    if args.score:
        score(args, device, dtype)
    if args.train:
        train(args, device, dtype)
    if args.costs:
        costs(args, device, dtype)


if __name__ == "__main__":
    main()
