"""Confirm a screened candidate on the test set: plain `train` (all 50,000 training images,
seeds 0, 1, 2 unless told, scored on the 10,000 test images) with the candidate's changes made
to the efficient preset, into bench/confirm/<candidate>/ (results.json and train_log.txt are
kept; the models and figures are not committed). Recipe changes only: a candidate that changes
the model needs that change in CNNclassify.py first.

    python bench/confirm.py ema_0.99 --data-dir data [any other option of `train`]
"""
import argparse
import dataclasses
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
import CNNclassify as C  # noqa: E402
import screen  # noqa: E402


def main():
    recipe_only = [name for name, (_, change_model) in screen.CANDIDATES.items() if not change_model]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", choices=recipe_only)
    args, train_options = parser.parse_known_args()
    changes = screen.CANDIDATES[args.candidate][0]
    C.PRESETS["efficient"] = dataclasses.replace(C.PRESETS["efficient"], **changes)
    # results.json and the resume hint name this command, not a plain train of the shipped recipe
    C.invocation = lambda _: " ".join(["python bench/confirm.py", *sys.argv[1:]])
    # a --model-dir among the options comes later and wins
    return C.main(["train", "--model-dir", str(BENCH / "confirm" / args.candidate),
                   *train_options])


if __name__ == "__main__":
    sys.exit(main())
