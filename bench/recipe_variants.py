"""Three details of airbench94_muon's schedule, and a smaller batch, tried on the shipped recipe
(64/256/256, 8 epochs, batch 256), each at full length: test accuracy with 2 and 6 views per seed.

    whiten_bias  conv1's bias (the whitening layer's) learns for the first 3/8 of the steps at the
                 BatchNorm biases' lr, falling linearly to 0 (airbench94_muon: 3 of 8 epochs);
                 its gradient is still computed afterwards (lr 0), so its seconds overstate it
    no_warmup    no warm-up: the lr falls linearly from its peak (airbench94_muon)
    batch128     batch 128 (lr and decay scale with it, as with --batch-size)
    baseline     the shipped recipe

    python bench/recipe_variants.py --data-dir ../shared/cifar10 --variants whiten_bias no_warmup --seeds 0 1 \
        > bench/recipe_variants_cpu_2core.txt
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402
from recipe import mirror_accuracy  # noqa: E402

WHITEN_BIAS_SHARE = 3 / 8


def train_steps_whiten_bias(run, batches):
    """C.train_steps, but the group marked "whiten_bias" follows its own schedule."""
    run.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    whiten_steps = int(WHITEN_BIAS_SHARE * run.total_steps)
    for x, y in batches:
        logits = run.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=run.recipe.label_smoothing)
        run.model.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        factor = C.lr_factor(run.step, run.total_steps, run.recipe.warmup_fraction)
        for optimizer in run.optimizers:
            for group in optimizer.param_groups:
                own = max(0.0, 1 - run.step / whiten_steps) if group.get("whiten_bias") else factor
                group["lr"] = group["peak_lr"] * own
            run.scaler.step(optimizer)
        run.scaler.update()
        run.step += 1
        C.update_average(run.average, run.model, run.step, run.recipe.average_decay)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
    return loss_sum, correct


def with_whiten_bias(make_optimizers):
    def make(model, recipe, dtype=torch.float32):
        optimizers = make_optimizers(model, recipe, dtype)
        biases = optimizers[0].param_groups[0]  # the BatchNorm biases' group
        optimizers[0].add_param_group({"params": [model.conv1.bias.requires_grad_(True)], "lr": biases["peak_lr"],
                                       "weight_decay": biases["weight_decay"], "peak_lr": biases["peak_lr"],
                                       "whiten_bias": True})
        return optimizers
    return make


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=["whiten_bias", "no_warmup", "batch128"],
                        choices=["whiten_bias", "no_warmup", "batch128", "baseline"])
    args = parser.parse_args()
    device = torch.device("cpu")
    dtype, how = C.training_format(device, "auto", C.recipe_for(device, preset="accurate"))
    machine = C.machine_description(device, dtype)
    data = C.load_cifar(args.data_dir)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)} ({how})", flush=True)
    for variant in args.variants:
        recipe = C.recipe_for(device, preset="accurate", batch_size=128 if variant == "batch128" else None)
        if variant == "no_warmup":
            recipe = dataclasses.replace(recipe, warmup_fraction=0.0)
        shipped = C.train_steps, C.make_optimizers
        if variant == "whiten_bias":
            C.train_steps, C.make_optimizers = train_steps_whiten_bias, with_whiten_bias(C.make_optimizers)
        for seed in args.seeds:
            model, history, seconds = C.train_seed(data, seed, recipe, device, dtype)
            print(json.dumps({"variant": variant, "seed": seed, "views_2": mirror_accuracy(model, data["test"], recipe.eval_batch),
                              "views_6": history[-1]["test_accuracy"], "seconds": round(seconds, 1),
                              "per_epoch": [round(h["test_accuracy"], 2) for h in history]}), flush=True)
        C.train_steps, C.make_optimizers = shipped


if __name__ == "__main__":
    main()
