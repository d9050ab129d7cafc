"""Recipe knobs the earlier benches left untried, each at full length on the shipped recipe
(64/256/256, 8 epochs, batch 256): any Recipe field set per variant, and the moving average's
decay screened for free in every run (extra averages of the same trained weights, kept beside
the shipped one). Per seed: test accuracy of the shipped average with 2 and 6 views, of each
extra average with 6 views, the training compute (forward MACs of one view x epochs, THOP) as a
multiple of the earlier recipe's (64/128/256, 15 epochs), and seconds (evaluations included).

A variant is NAME:FIELD=VALUE[,FIELD=VALUE...], values as Python literals, e.g.
"muon_hi:muon_lr_per_1024=0.24" or "w48x10:widths=(48,256,256),epochs=10".

    python bench/recipe_knobs.py --data-dir ../shared/cifar10 --seeds 0 --variants "w48x10:widths=(48,256,256),epochs=10" \
        "muon_hi:muon_lr_per_1024=0.24" "muon_lo:muon_lr_per_1024=0.12" > bench/recipe_knobs_cpu_2core.txt
    python bench/recipe_knobs.py --data-dir ../shared/cifar10 --seeds 1 2 --variants "w48x10:widths=(48,256,256),epochs=10" \
        >> bench/recipe_knobs_cpu_2core.txt

(The first run also listed decay_hi:decay_per_1024=4e-3 and lr_hi:lr_per_1024=2.25; it was stopped
for time after the three above, so its header names them.) Muon lr 0.12 on seeds 1 and 2 was run
as `train` itself: bench/muon_lr_012_cpu_2core.txt.
"""
import argparse
import ast
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402
from recipe import EARLIER, mirror_accuracy  # noqa: E402

EXTRA_DECAYS = (0.95, 0.99, 0.995)


def parse_variant(text):
    """NAME:FIELD=VALUE,... -> (name, {field: value}); the settings are read as a call's keyword
    arguments (Python's own parser), their values as literals; field names are Recipe's."""
    name, _, settings = text.partition(":")
    try:
        keywords = ast.parse(f"variant({settings})", mode="eval").body.keywords
        fields = {keyword.arg: ast.literal_eval(keyword.value) for keyword in keywords}
    except (SyntaxError, ValueError) as error:
        raise SystemExit(f"{text}: not NAME:FIELD=VALUE,... ({error})") from None
    unknown = fields.keys() - {field.name for field in dataclasses.fields(C.Recipe)}
    if unknown:
        raise SystemExit(f"{text}: {', '.join(sorted(unknown))} not Recipe fields")
    return name, fields


def six_view_accuracy(model, test, batch_size):
    """Test accuracy of a trained model with the 6 views the shipped model uses."""
    _, confusion = C.evaluate(C.ViewAverage(model, 6), *test, batch_size)
    return 100 * int(confusion.trace()) / len(test[1])


class ExtraAverages:
    """C.update_average, also moving one extra average per decay in EXTRA_DECAYS (created from the
    shipped average before its first update, when every decay's ramp gives the same weight)."""

    def __init__(self, update):
        self.update, self.averages = update, {}

    def __call__(self, average, model, step, decay):
        if step == 1:
            self.averages = {d: copy.deepcopy(average) for d in EXTRA_DECAYS}
        for extra_decay, extra in self.averages.items():
            self.update(extra, model, step, extra_decay)
        self.update(average, model, step, decay)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["baseline:"])
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    device = torch.device("cpu")
    dtype, how = C.training_format(device, "auto", C.recipe_for(device, preset="accurate"))
    machine = C.machine_description(device, dtype)
    data = C.load_cifar(args.data_dir)
    earlier = C.count_costs(C.build_cnn(dataclasses.replace(C.PRESETS["accurate"], widths=EARLIER[0])))[0] * EARLIER[1]
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{C.precision_name(dtype)} ({how}); variants: {' '.join(args.variants)}", flush=True)
    shipped_update = C.update_average
    for name, fields in variants:
        recipe = dataclasses.replace(C.recipe_for(device, preset="accurate"), **fields)
        compute = C.count_costs(C.build_cnn(recipe))[0] * recipe.epochs / earlier
        for seed in args.seeds:
            extras = ExtraAverages(shipped_update)
            C.update_average = extras
            try:
                model, history, seconds = C.train_seed(data, seed, recipe, device, dtype)
            finally:
                C.update_average = shipped_update
            ema = {str(d): round(six_view_accuracy(average.cpu(), data["test"], recipe.eval_batch), 2)
                   for d, average in extras.averages.items()}
            print(json.dumps({"variant": name, "fields": {k: str(v) for k, v in fields.items()}, "seed": seed,
                              "compute": round(compute, 3),
                              "views_2": mirror_accuracy(model, data["test"], recipe.eval_batch),
                              "views_6": history[-1]["test_accuracy"], "views_6_by_decay": ema,
                              "seconds": round(seconds, 1),
                              "per_epoch": [round(h["test_accuracy"], 2) for h in history]}), flush=True)


if __name__ == "__main__":
    main()
