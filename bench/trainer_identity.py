"""The trainer as it is against the trainer of an earlier commit (CNNclassify.py read with
`git show`): the same seed of the same recipe must give the same weights and training losses,
bit for bit, on the CPU, for each preset (the earlier trainer given the preset, or, before
presets existed, its widths and epochs); and the seconds of each, run one after the other in
this process, twice, in alternating order. Test figures are compared where both evaluate the
same test-time views.

    python bench/trainer_identity.py --data-dir ../shared/cifar10 --commit c9a4b61 > bench/trainer_identity_cpu_2core.txt
"""
import argparse
import contextlib
import dataclasses
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


def load_old_trainer(folder, commit):
    path = Path(folder) / "old_CNNclassify.py"
    path.write_text(subprocess.run(["git", "show", f"{commit}:CNNclassify.py"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location("old_CNNclassify", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_runs(runs):
    """Each run twice, in alternating order: {name: result}, {name: [seconds, seconds]}."""
    results, seconds = {}, {name: [] for name in runs}
    for order in (list(runs), list(runs)[::-1]):
        for name in order:
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):
                results[name] = runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return results, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--commit", default="545af7b", help="the earlier trainer's commit")
    parser.add_argument("--subset", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    data = C.take_subset(C.load_cifar(args.data_dir), args.subset)
    machine = C.machine_description(cpu, torch.float32)
    print(f"machine: {machine['cpu']}, "
          f"{machine['torch_threads']} torch threads, torch {machine['torch']}, float32; seed 0, "
          f"{args.epochs} epochs of the first {args.subset} images, batch 256")
    print(f"{'preset':<10s} {'trainer':<16s} {'test acc per epoch':<20s} {'train loss per epoch':<24s} "
          f"{'seconds (2 runs)':>16s}")
    with tempfile.TemporaryDirectory() as folder:
        old = load_old_trainer(folder, args.commit)
        for preset in C.PRESETS:
            recipe = C.recipe_for(cpu, epochs=args.epochs, preset=preset)
            old_recipe = (old.recipe_for(cpu, epochs=args.epochs, preset=preset) if hasattr(old, "PRESETS")
                          else dataclasses.replace(old.recipe_for(cpu, epochs=args.epochs), widths=recipe.widths))
            runs = {f"before ({args.commit})": lambda: old.train_seed(data, 0, old_recipe, cpu, torch.float32),
                    "now": lambda: C.train_seed(data, 0, recipe, cpu, torch.float32)}
            results, seconds = timed_runs(runs)
            for name, (_, history, _) in results.items():
                accuracies = " ".join(f"{h['test_accuracy']:.2f}" for h in history)
                losses = " ".join(f"{h['train_loss']:.6f}" for h in history)
                print(f"{preset:<10s} {name:<16s} {accuracies:<20s} {losses:<24s} "
                      f"{' '.join(f'{s:.1f}' for s in seconds[name]):>16s}")
            (old_model, old_history, _), (new_model, new_history, _) = results.values()
            same_weights = all(torch.equal(a, b) for a, b in
                               zip(old_model.state_dict().values(), new_model.state_dict().values()))
            same_views = getattr(old_recipe, "views", 6) == recipe.views
            keys = ["train_loss", "train_accuracy"] + (["test_loss", "test_accuracy"] if same_views else [])
            same_history = all(a[k] == b[k] for a, b in zip(old_history, new_history) for k in keys)
            print(f"{preset:<10s} same weights, bit for bit: {same_weights}; same {', '.join(keys)}: {same_history}")


if __name__ == "__main__":
    main()
