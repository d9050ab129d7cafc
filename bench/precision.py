"""Training speed by number format where oneDNN may or may not use native bfloat16, and
whether `--precision auto` picks the fastest format there.

ONEDNN_MAX_CPU_ISA makes oneDNN behave like a CPU without the newer instructions (AVX512_CORE:
AVX-512 without BF16, e.g. older Xeons; AVX2: most laptops and desktops, AMD Zen 2/3). It is
read once per process, so each row runs in a fresh process, with an empty cache of measured
formats, so auto measures anew. Part 1 times training steps of the net in each format
(bench/throughput.py's function, batch 256, channels_last) and shows what auto picks
(CNNclassify.training_format); part 2 runs `train --seed 0 --epochs 1 --subset 8192` itself
with auto and compares its images/s with the uncapped run.

    python bench/precision.py --data-dir ../shared/cifar10 > bench/precision_cpu_2core.txt
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import CNNclassify as C  # noqa: E402

CAPS = ["", "AVX512_CORE", "AVX2"]  # "" = no cap: what the CPU has
WIDTHS = [C.PRESETS["accurate"].widths, (64, 128, 256)]


def in_process(cap, *argv):
    """Run argv in a fresh Python under the ISA cap, with a cache of formats of its own."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, XDG_CACHE_HOME=cache)
        env.pop("ONEDNN_MAX_CPU_ISA", None)
        if cap:
            env["ONEDNN_MAX_CPU_ISA"] = cap
        return subprocess.run([sys.executable, *map(str, argv)], env=env, capture_output=True, text=True, check=True)


def measure_here(widths):
    """Child: one line of JSON with images/s per format for these widths, and auto's pick."""
    sys.path.insert(0, str(ROOT / "bench"))
    from throughput import images_per_second
    rates = {C.precision_name(d): images_per_second(widths, 256, True, d, steps=3, warmup=1)
             for d in (torch.float32, torch.bfloat16)}
    device = torch.device("cpu")
    dtype, how = C.training_format(device, "auto", dataclasses.replace(C.recipe_for(device, preset="accurate"), widths=widths))
    print(json.dumps({"rates": rates, "auto": C.precision_name(dtype), "how": how}))


def train_images_per_second(cap, data_dir):
    with tempfile.TemporaryDirectory() as folder:
        in_process(cap, ROOT / "CNNclassify.py", "train", "--seed", "0", "--epochs", "1", "--subset", "8192",
                   "--data-dir", data_dir, "--model-dir", folder)
        results = json.loads((Path(folder) / C.RESULTS_FILE).read_text())
    return results["runs"][0]["images_per_second"], results["precision"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--child", nargs=3, type=int, metavar="WIDTH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_here(tuple(args.child))
        return
    machine = C.machine_description(torch.device("cpu"), torch.float32)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"bfloat16 flags {machine['cpu_bfloat16_flags']}")
    print("\ntraining steps, batch 256, channels_last (images/s); auto = what `--precision auto` picks")
    print(f"{'ONEDNN_MAX_CPU_ISA':<20s} {'widths':<15s} {'float32':>8s} {'bfloat16':>9s} {'fastest':>9s} "
          f"{'auto':>9s}  how auto chose")
    for widths in WIDTHS:
        for cap in CAPS:
            row = json.loads(in_process(cap, __file__, "--child", *widths).stdout)
            fastest = max(row["rates"], key=row["rates"].get)
            print(f"{cap or '(none: native)':<20s} {str(widths):<15s} {row['rates']['float32']:8.0f} "
                  f"{row['rates']['bfloat16']:9.0f} {fastest:>9s} {row['auto']:>9s}  {row['how']}", flush=True)
    print("\n`train --seed 0 --epochs 1 --subset 8192` with the default --precision auto")
    print(f"{'ONEDNN_MAX_CPU_ISA':<20s} {'format':<9s} {'images/s':>9s} {'x uncapped':>11s}")
    base = None
    for cap in CAPS:
        rate, precision = train_images_per_second(cap, args.data_dir)
        base = base or rate
        print(f"{cap or '(none: native)':<20s} {precision:<9s} {rate:9.0f} {rate / base:11.2f}", flush=True)


if __name__ == "__main__":
    main()
