"""Screen variants of the efficient preset on held-out training images, one row per finished
(candidate, seed), appended to bench/screen_rows.jsonl the moment it finishes. Each candidate
trains on the first 45,000 training images (data_batch_1..5 as read, in order) and is scored on
the last 5,000 (the validation split); the 10,000 test images are never read. A rerun skips the
rows already there for the same candidate definition, seed, CPU kind and precision, so a screen
stopped anywhere goes on where it was.

    python bench/screen.py --data-dir data --seeds 0 1 --workers 2   # the screen (background)
    python bench/screen.py --table                                  # its rows so far, markdown
    python bench/screen.py --data-dir data --subset 512 --epochs 1 --rows /tmp/rows.jsonl

--workers N runs N trainings side by side with cpu_count // N torch threads each (on 2 cores,
two one-thread runs finish more rows per hour than one two-thread run: bench/README.md).

A candidate is a change of the Recipe and, where the architecture changes, a function applied
to the CNN that build_cnn returns (before conv1 is set from the data and the optimisers are
made, so Muon trains the new convs like the others).
"""
import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

ROWS = Path(__file__).resolve().parent / "screen_rows.jsonl"
VALIDATION = 5000  # the last 5,000 training images: held out from every candidate's training


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


def extra_conv(model, block=0):
    """One more dirac-initialised 3x3 conv -> BN -> GELU at the end of `block` (depth through an
    identity path, as hlb-CIFAR10 and airbench add it): at 14x14 and 32 channels, +1.8 M MACs."""
    width = model.blocks[block][4].out_channels
    conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight)
    norm = nn.BatchNorm2d(width, momentum=model.settings["bn_momentum"], eps=1e-12)
    norm.weight.requires_grad_(False)
    model.blocks[block] = nn.Sequential(*model.blocks[block], conv, norm, nn.GELU())
    return model.to(memory_format=torch.channels_last)


def extra_b1_pointwise_b3(model):
    return pointwise_last_conv(extra_conv(model))


def unpooled_last_block(model, block=2):
    """Block `block` without its max pool: its second conv and the global max pool see 7x7
    pixels instead of 3x3 (the 7 -> 3 pool also drops a row and a column)."""
    model.blocks[block][1] = nn.Identity()
    return model


CANDIDATES = {  # name: (changes of the Recipe, change of the model or None)
    "shipped": ({}, None),
    "1x1_b3_24ep": ({"epochs": 24}, pointwise_last_conv),
    "residual_b23": ({}, residual_blocks),
    "smoothing_0.1": ({"label_smoothing": 0.1}, None),
    "ema_0.99": ({"average_decay": 0.99}, None),
    "zca_eps_1e-3": ({"whitening_eps": 1e-3}, None),
    "extra_b1_1x1_b3_22ep": ({"epochs": 22}, extra_b1_pointwise_b3),
    "26ep": ({"epochs": 26}, None),
    "1x1_b3": ({}, pointwise_last_conv),
    "w32_128_96_1x1_b3_24ep": ({"widths": (32, 128, 96), "epochs": 24}, pointwise_last_conv),
    # under ResNet-20's 272,474 parameters (225,472; 24.6 M MACs), more epochs for the width
    "w32_96_96_1x1_b3_26ep": ({"widths": (32, 96, 96), "epochs": 26}, pointwise_last_conv),
    # equal cost: the optimisers' step sizes and the batch (lr scales with batch / 1024)
    "lr_2.0": ({"lr_per_1024": 2.0}, None),
    "muon_lr_0.24": ({"muon_lr_per_1024": 0.24}, None),
    "lr_1.0": ({"lr_per_1024": 1.0}, None),
    "muon_lr_0.12": ({"muon_lr_per_1024": 0.12}, None),
    "batch_128": ({"batch_size": 128}, None),
    # the MACs moved: 40/128/128 (519,264 params, 38.7 M MACs); block 3 at 7x7 (39.7 M MACs)
    "w40_128_128": ({"widths": (40, 128, 128)}, None),
    "w32_128_128_b3_7x7": ({"widths": (32, 128, 128)}, unpooled_last_block),
    # weight decay (BN biases and the head only: Muon holds the filters' norm), 2x either way
    "wd_4e-3": ({"decay_per_1024": 4e-3}, None),
    "wd_1e-3": ({"decay_per_1024": 1e-3}, None),
    # the best two of the above together (each +0.1 on two seeds: within the noise alone)
    "ema_0.99_zca_1e-3": ({"average_decay": 0.99, "whitening_eps": 1e-3}, None),
}


def definition(name):
    """What a candidate is, as a row keeps it: a changed definition is a new row."""
    changes, change_model = CANDIDATES[name]
    return json.dumps({"changes": changes, "model": getattr(change_model, "__name__", None)},
                      sort_keys=True)


def split(data, subset=0):
    """{"train": the first 45,000 training images, "test": the last 5,000} (subset: the first N
    of each part, for a dry run)."""
    images, labels = data["train"]
    held = len(images) - (VALIDATION if len(images) > 2 * VALIDATION else len(images) // 10)
    return C.take_subset({"train": (images[:held], labels[:held]),
                          "test": (images[held:], labels[held:])}, subset)


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


def cpu_kind():
    return f"family {C.cpuinfo_field('cpu family')} model {C.cpuinfo_field('model')}"


def commit():
    """The commit the screen runs, '+' when the script or the trainer differ from it."""
    run = lambda *a: subprocess.run(["git", *a], cwd=C.ROOT, capture_output=True, text=True)
    head = run("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    dirty = run("status", "--porcelain", "CNNclassify.py", "bench/screen.py").stdout.strip()
    return head + ("+" if dirty else "")


WORKER = {}  # in each worker process: the data, device, number format, subset and commit


def start_worker(data_dir, subset, threads):
    torch.set_num_threads(threads)
    WORKER["device"] = torch.device("cpu")
    WORKER["dtype"] = C.training_format(WORKER["device"], "auto")[0]
    WORKER["data"] = split(C.load_cifar(data_dir, parts=("train",)), subset)
    WORKER["subset"] = subset
    WORKER["commit"] = commit()  # the code this worker imported, not what HEAD becomes later


def run_job(job):
    """One (candidate, seed): trained, scored on the validation images in float32 at one view,
    costed by THOP; the row."""
    name, seed, epochs, workers = job
    data, device, dtype = WORKER["data"], WORKER["device"], WORKER["dtype"]
    start, cpu_start = time.perf_counter(), time.process_time()
    model, history = train_candidate(data, name, seed, device, dtype, epochs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model = C.ViewAverage(model.float(), 1)
    model.cnn.compute_dtype = torch.float32
    right = C.evaluate(model, *data["test"], C.eval_batch(device))[1]
    macs, params = C.count_costs(model.cnn)
    machine = C.machine_description(device, dtype)
    return {"candidate": name, "definition": definition(name), "seed": seed,
            "epochs": len(history), "subset": WORKER["subset"],
            "val_accuracy": 100 * right / len(data["test"][1]),
            "val_right": right, "val_images": len(data["test"][1]),
            "train_images": len(data["train"][1]), "macs": macs, "params": params,
            "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "cpu": machine["cpu"], "cpu_kind": cpu_kind(), "precision": C.precision_name(dtype),
            "threads": torch.get_num_threads(), "side_by_side": workers,
            "torch": torch.__version__, "commit": WORKER["commit"],
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "val_curve": [round(row["test_accuracy"], 2) for row in history]}


def key(row):
    """What makes two rows the same run: a rerun skips a job whose key is in the file."""
    return (row["candidate"], row["definition"], row["seed"], row["epochs"], row["subset"],
            row["cpu_kind"], row["precision"])


def epochs_of(name, override=None):
    return override or CANDIDATES[name][0].get("epochs", C.PRESETS["efficient"].epochs)


def read_rows(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.is_file() else []


def append_row(path, row):
    """One line, written and flushed at once: a stop loses at most the row in progress."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def table(rows):
    """The rows as markdown, grouped by CPU kind and precision. The time ratio is of CPU seconds
    (a one-thread run's CPU time is its work, whatever else shares the machine; wall seconds are
    shown too) to the mean of that group's `shipped` rows run the same way."""
    lines = ["| candidate | seed | CPU, precision, threads x side by side | epochs | val acc "
             "(5,000) | MACs | params | wall s | CPU s | CPU time ratio | commit |",
             "|" + " --- |" * 11]
    for row in sorted(rows, key=lambda r: (r["cpu_kind"], r["precision"], r["candidate"] !=
                                           "shipped", r["candidate"], r["seed"])):
        base = [r["cpu_seconds"] for r in rows if r["candidate"] == "shipped" and all(
            r[k] == row[k] for k in ("cpu_kind", "precision", "threads", "side_by_side"))]
        ratio = f"{row['cpu_seconds'] / np.mean(base):.2f}x" if base else "-"
        lines.append(f"| {row['candidate']} | {row['seed']} | {row['cpu_kind']}, "
                     f"{row['precision']}, {row['threads']} x {row['side_by_side']} | "
                     f"{row['epochs']} | {row['val_accuracy']:.2f}% | {row['macs']:,} | "
                     f"{row['params']:,} | {row['seconds']:.0f} | {row['cpu_seconds']:.0f} | "
                     f"{ratio} | {row['commit']} |")
    return lines


def groups_of(rows):
    """{(CPU kind, precision, candidate): its rows}: rows compare only within a CPU kind and
    precision."""
    groups = {}
    for row in rows:
        groups.setdefault((row["cpu_kind"], row["precision"], row["candidate"]), []).append(row)
    return groups


def paired_mean(runs, base, field, compare):
    """The mean of compare(run, the baseline run of its seed) over the seeds both have (paired:
    a seed's data order is the same), or None when they share no seed."""
    base = {r["seed"]: r for r in base}
    pairs = [compare(r[field], base[r["seed"]][field]) for r in runs if r["seed"] in base]
    return np.mean(pairs) if pairs else None


def pooled_sd(groups):
    """One run's standard deviation: the spread of each group's seeds around its own mean (so a
    candidate's effect does not count as noise), pooled over the groups with two or more."""
    spread = [[r["val_accuracy"] for r in runs] for runs in groups if len(runs) >= 2]
    squares = sum(np.sum((np.array(accs) - np.mean(accs)) ** 2) for accs in spread)
    return (squares / sum(len(accs) - 1 for accs in spread)) ** 0.5 if spread else None


def summary(rows):
    """One line per candidate: its mean over seeds and the difference from the `shipped` rows of
    the same seeds, CPU kind and precision."""
    lines = ["| candidate | CPU, precision | seeds | mean val acc | vs shipped, same seeds | "
             "params | MACs | CPU time ratio |", "|" + " --- |" * 8]
    groups = groups_of(rows)
    for (kind, precision, name), runs in sorted(groups.items(), key=lambda g: (
            g[0][:2], g[0][2] != "shipped", -np.mean([r["val_accuracy"] for r in g[1]]))):
        base = groups.get((kind, precision, "shipped"), [])
        delta = paired_mean(runs, base, "val_accuracy", lambda a, b: a - b)
        ratio = paired_mean(runs, base, "cpu_seconds", lambda a, b: a / b)
        lines.append(f"| {name} | {kind}, {precision} | "
                     f"{' '.join(str(r['seed']) for r in sorted(runs, key=lambda r: r['seed']))} | "
                     f"{np.mean([r['val_accuracy'] for r in runs]):.2f}% | "
                     f"{'-' if delta is None else f'{delta:+.2f}'} | {runs[0]['params']:,} | "
                     f"{runs[0]['macs']:,} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    sd = pooled_sd(groups.values())
    if sd is not None:
        ranges = [np.ptp([r["val_accuracy"] for r in runs]) for runs in groups.values()
                  if len(runs) >= 2]
        lines.append(f"\nThe seeds of one candidate lie {min(ranges):.2f} to {max(ranges):.2f} "
                     f"points apart ({len(ranges)} candidates with two or more seeds): one run's "
                     f"standard deviation, pooled, is about {sd:.2f}.")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--workers", type=int, default=1, help="trainings side by side")
    parser.add_argument("--rows", default=str(ROWS), help="the rows file (appended to)")
    parser.add_argument("--subset", type=int, default=0, help="first N images (a dry run)")
    parser.add_argument("--epochs", type=int, help="override every candidate's epochs (dry run)")
    parser.add_argument("--table", action="store_true", help="print the rows as markdown, run "
                        "nothing")
    args = parser.parse_args()
    if args.table:
        rows = read_rows(args.rows)
        print("\n".join(summary(rows) + [""] + table(rows)))
        return
    device = torch.device("cpu")
    dtype = C.training_format(device, "auto")[0]
    done = {key(r) for r in read_rows(args.rows)}
    names = ["shipped"] + [n for n in args.candidates if n != "shipped"]  # the baseline first
    order = [("shipped", seed) for seed in args.seeds]  # the baseline's seeds first
    order += [(name, seed) for seed in args.seeds for name in names[1:]]
    jobs = [(name, seed, args.epochs, args.workers) for name, seed in order
            if (name, definition(name), seed, epochs_of(name, args.epochs), args.subset,
                cpu_kind(), C.precision_name(dtype)) not in done]
    print(f"{len(jobs)} rows to train ({len(names) * len(args.seeds) - len(jobs)} already in "
          f"{args.rows}), {args.workers} side by side", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    start = time.perf_counter()
    if args.workers == 1:
        start_worker(args.data_dir, args.subset, threads)
        finished = map(run_job, jobs)
    else:  # each worker loads the data once; rows come back as they finish
        pool = multiprocessing.get_context("spawn").Pool(
            args.workers, start_worker, (args.data_dir, args.subset, threads))
        finished = pool.imap_unordered(run_job, jobs)
    for row in finished:
        append_row(args.rows, row)
        print(f"{row['candidate']:<24s} seed {row['seed']}  val {row['val_accuracy']:.2f}%  "
              f"{row['macs']:,} MACs  {row['params']:,} params  {row['seconds']:.0f} s",
              flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
