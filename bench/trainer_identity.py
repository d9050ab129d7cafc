"""The restructured trainer (Run, train_steps, train_seed: one loop, resumable) against the trainer
before the restructure (CNNclassify.py as of commit c79ddc5, read with `git show`; it reproduced
the shipped model's trainer bit for bit): the same seed must give the same history and the same
weights, bit for bit, on the CPU; and the seconds of each, run one after the other in this
process, twice, in alternating order.

    python bench/trainer_identity.py --data-dir ../shared/cifar10 > bench/trainer_identity_cpu_2core.txt
"""
import argparse
import dataclasses
import contextlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import CNNclassify as C  # noqa: E402

PREVIOUS_TRAINER = "c79ddc5"


def load_old_trainer(folder):
    path = Path(folder) / "old_CNNclassify.py"
    path.write_text(subprocess.run(["git", "show", f"{PREVIOUS_TRAINER}:CNNclassify.py"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location("old_CNNclassify", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--subset", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    data = C.take_subset(C.load_cifar(args.data_dir), args.subset)
    with tempfile.TemporaryDirectory() as folder:
        old = load_old_trainer(folder)
        runs = {
            "before (c79ddc5)": lambda: old.train_one_seed(data, 0, old.recipe(cpu, epochs=args.epochs), cpu, torch.float32,
                                                           old.DEVICE_DEFAULTS["cpu"]["eval_batch"]),
            "restructured": lambda: C.train_seed(data, 0, dataclasses.replace(  # c79ddc5's widths
                C.recipe_for(cpu, epochs=args.epochs), widths=tuple(old.HYPERPARAMETERS["widths"])), cpu, torch.float32)}
        results, seconds = {}, {name: [] for name in runs}
        for order in (list(runs), list(runs)[::-1]):
            for name in order:
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    results[name] = runs[name]()
                seconds[name].append(time.perf_counter() - start)
    machine = C.machine_description(cpu, torch.float32)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, float32; "
          f"seed 0, {args.epochs} epochs of the first {args.subset} images, batch 256")
    print(f"{'trainer':<16s} {'test acc per epoch':<22s} {'train loss per epoch':<26s} {'seconds (2 runs)':>17s}")
    for name, (_, history, _) in results.items():
        accuracies = " ".join(f"{h['test_accuracy']:.2f}" for h in history)
        losses = " ".join(f"{h['train_loss']:.6f}" for h in history)
        print(f"{name:<16s} {accuracies:<22s} {losses:<26s} {' '.join(f'{s:.1f}' for s in seconds[name]):>17s}")
    (old_model, old_history, _), (new_model, new_history, _) = results.values()
    same_weights = all(torch.equal(a, b) for a, b in zip(old_model.state_dict().values(), new_model.state_dict().values()))
    same_history = all(a[k] == b[k] for a, b in zip(old_history, new_history)
                       for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"))
    print(f"same weights, bit for bit: {same_weights}; same losses and accuracies: {same_history}")


if __name__ == "__main__":
    main()
