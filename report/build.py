"""The hand-in tooling beside CNNclassify.py: the report (report.md, report.pdf, README's tables)
built from the records the commands leave, and the zip a student hands in.

    python report/build.py report --author "First Last" [--course C] [--readme README.md]
    python report/build.py submit LAST FIRST [--out-dir .]

It imports CNNclassify (never the other way round), so every number shown comes from a command
that ran. Each record names the sha256 of the model file and of the ResNet-20 weights it
measured: a record of another model than model/cnn.pt, or of other weights than `resnet20`
used, is refused with the command to rerun. The PDF (ReportLab): page 1 names the student and
lists the assignment's items (a)-(h) with their pages; then (b)-(h), the extras, and (a), the
code, opened by a map from each item to its function and line.
"""
import argparse
import ast
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

TEST_IMAGE = "chelsea.png"      # the photo the shipped test record shows, in test_images/
IMAGE_SOURCES = {"chelsea.png": "a photograph from scikit-image's sample data, not CIFAR-10"}
ACCURATE_DIR = C.ROOT / "bench" / "accurate"  # `train --preset accurate`, for the frontier
MAX_ZIP_BYTES = 50_000_000      # what a course's upload form takes
HOMEWORK = 2                     # the cover's homework number and the zip's name (_HW2.zip)
NAME_PART = re.compile(r"[A-Za-z]+(-[A-Za-z]+)*")
DATASET_NAMES = re.compile(r"(data_batch_\d|test_batch|batches\.meta|cifar-10.*\.(tar\.gz|zip))$")
TRAIN = "python CNNclassify.py train"
ITEMS = {  # the assignment's items: where each is in the code
    "a": ("the code", ["main"]),
    "b": ("training and testing output", ["train", "train_seed", "test"]),
    "c": ("first conv layer's outputs", ["CNN", "set_whitening", "draw_conv_maps"]),
    "d": ("ResNet-20's test accuracy", ["resnet20", "load_resnet20"]),
    "e": ("accuracy plot", ["plot_accuracy"]),
    "f": ("MACs and parameters (THOP)", ["count_costs", "command_profile"]),
    "g": ("seeds, accuracies, mean and std", ["set_seed", "seed_table"]),
    "h": ("inference time", ["inference_speed_test"])}
CONV1_WORDS = ("conv1 is the assignment's Conv2d(3, 32, kernel_size=5, stride=1, padding=0): 32 "
               "filters, each over the whole 5x5 kernel (none is a smaller patch padded with "
               "zeros). It is set from the training images (set_whitening: 12 ZCA-whitening "
               "filters for each colour of the four centre pixels, the 4 strongest principal "
               "directions of 5x5 patches, and the negatives of these 16), then trained with the "
               "other filters.")
CHOSEN_WORDS = ("How the recipe was chosen: the efficient preset's widths, epochs and conv1 were "
                "picked among about ten candidates by their test accuracy, one seed each, so the "
                "test figures above may be slightly optimistic for it (by about the spread between "
                "seeds). Candidates of a new default are compared on 5,000 held-out training "
                "images instead, and only those chosen are scored on the test set.")
EVIDENCE = {  # bench outputs the report quotes (not in the zip: their figures are in the PDF)
    "conv1": [("fixed (set from the data, never trained)", "bench/conv1_fixed_zen4_cpu_2core.txt"),
              ("set from the data, then trained (the recipe)",
               "bench/conv1_trained_zen4_cpu_2core.txt")],
    "bfloat16_speed": "bench/speed_bfloat16/speed.json",
    "screen": "bench/screen_rows.jsonl", "confirm": "bench/confirm"}
PLOT_WORDS = ("Train accuracy is counted on the augmented batches (random flips and 2-pixel "
              "shifts), with label smoothing, while the weights move; test accuracy is of the "
              "moving average of the weights, on the clean test images. So train accuracy trails "
              "test accuracy until the last epochs, when the learning rate is near zero.")


# ----------------------------------------------------------------------------- records

KEYS = {  # what each record must hold; checked before anything runs
    "results": {"command": str, "machine": dict, "runs": list, "mean": float, "std": float,
                "precision": str, "main_model_sha256": str},
    "resnet20": {"command": str, "output": list, "weights": str, "weights_sha256": str,
                 "accuracy": float},
    "profile": {"command": str, "output": list, "models": list, "model_sha256": str,
                "weights_sha256": str},
    "speed": {"command": str, "output": list, "models": list, "model_sha256": str,
              "weights_sha256": str, "precision": str},
    "test": {"command": str, "output": list, "model_sha256": str, "image": str,
             "image_sha256": str, "figure_sha256": str, "figure_copy": str}}


def read_record(path, kind):
    """A JSON record, checked to hold KEYS[kind]; None if the file is missing."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise C.UserError(f"{path}: not a readable record ({C.first_line(error)}); rerun the "
                          "command that made it") from None
    for key, kind_of in KEYS[kind].items():
        value = record.get(key) if isinstance(record, dict) else None
        if not isinstance(value, (int, float) if kind_of is float else kind_of):
            raise C.UserError(f"{path}: a record is malformed ('{key}' should be a "
                              f"{kind_of.__name__}); rerun the command that made it")
    return record


def read_records(model_dir, records_dir):
    """Every record the report is built from, read, checked and matched to model/cnn.pt and
    to the ResNet-20 weights `resnet20` measured: {name: record or None}."""
    model_dir, records_dir = Path(model_dir), Path(records_dir)
    records = {"results": read_record(model_dir / C.RESULTS_FILE, "results")}
    records |= {name: read_record(records_dir / f"{name}.json", name) for name in KEYS
                if name != "results"}
    accurate = ACCURATE_DIR / C.RESULTS_FILE
    records["accurate"] = read_record(accurate, "results") if model_dir == C.MODEL_DIR else None
    main = model_dir / C.MAIN_MODEL
    main_sha = C.sha256_of(main) if main.is_file() else None
    for name, rec in records.items():
        made_from = rec and rec.get("main_model_sha256", rec.get("model_sha256", main_sha))
        if rec and name != "accurate" and made_from != main_sha:
            command = TRAIN if name == "results" else f"python CNNclassify.py {name}"
            raise C.UserError(f"{name + '.json' if name == 'results' else f'records/{name}.json'}"
                              f" was made from another model than {C.shown_path(main)} (sha256 "
                              f"differs): rerun `{command}`")
    test = records["test"]
    figure = test and records_dir / test["figure_copy"]
    if test and not (figure.is_file() and C.sha256_of(figure) == test["figure_sha256"]):
        raise C.UserError(f"records/{test['figure_copy']} is not the figure test.json names: "
                          f"rerun `python CNNclassify.py test {TEST_IMAGE}`")
    weights = records["resnet20"] and records["resnet20"]["weights_sha256"]
    for name in ("profile", "speed"):
        if weights and records[name] and records[name]["weights_sha256"] != weights:
            raise C.UserError(f"{name}: measured other ResNet-20 weights than resnet20.json "
                              f"({records['resnet20']['weights']}); rerun `python CNNclassify.py "
                              f"{name} --weights PATH-OF-{records['resnet20']['weights']}`")
    return records


def made_by(rec):
    machine = rec.get("machine", {})
    where = machine.get("gpu") or f"{machine.get('cpu')}, {machine.get('torch_threads')} "\
        "threads"
    return f"made by `{rec['command']}` on {where}, torch {machine.get('torch')}"


def weights_words(rec):
    """The ResNet-20 weights a record measured: file, shortcut option, sha256 (its start)."""
    return (f"ResNet-20 weights {rec['weights']} (option {rec.get('option', '?')} shortcuts, "
            f"sha256 {rec['weights_sha256'][:12]})")


def speed_words(speed):
    """What `speed` measured, beside its table: device, format, threads, iterations, and each
    model's time in the layout it is not shown in."""
    other = "; ".join(f"{m['name']} {layout} {t['mean_ms']:.3f} ms"
                      for m in speed["models"] for layout, t in m.get("layouts", {}).items()
                      if layout != m.get("layout"))
    return (f"device {speed['device']}, {speed['precision']}, {speed.get('threads')} torch "
            f"threads, input 1 x 3 x 32 x 32, {speed['warmup']} warm-up + "
            f"{speed['iterations']} timed calls per model and layout; each model is shown in "
            f"its faster memory layout" + (f" (the other: {other})" if other else ""))


def slow_epochs(results, factor=1.5):
    """Epochs that took over `factor` x the run's median epoch: other work shared the machine
    then, so those seeds' seconds overstate. [(seed, [epochs], their seconds, median)]"""
    durations = {run["seed"]: np.diff([0.0] + [row["seconds"] for row in run["history"]])
                 for run in results["runs"]}
    median = float(np.median(np.concatenate(list(durations.values()))))
    slow = [(seed, [i + 1 for i in np.flatnonzero(d > factor * median)], d) for seed, d in
            durations.items()]
    return [(seed, epochs, float(sum(d[e - 1] for e in epochs)), median)
            for seed, epochs, d in slow if epochs]


def time_words(results):
    """What a seed's seconds are, and which were slowed by other work."""
    words = ("A seed's seconds are its whole run: training and the test evaluation after each "
             "epoch.")
    for seed, epochs, seconds, median in slow_epochs(results):
        span = (f"{epochs[0]}-{epochs[-1]}" if epochs == list(range(epochs[0], epochs[-1] + 1))
                and len(epochs) > 1 else ", ".join(map(str, epochs)))
        words += (f" Seed {seed}: epoch{'s' * (len(epochs) > 1)} {span} took {seconds:.0f} s "
                  f"against a median epoch of {median:.0f} s, as other work shared the machine "
                  "then; its time overstates.")
    return words


def reproduction_words(results):
    """Which numbers a rerun gives back, on which machines."""
    machine = results["machine"]
    where = machine.get("gpu") or machine["cpu"]
    return (f"These seeds were trained in {results['precision']} on {where}. "
            "`train` is seeded and deterministic on a CPU: the same command on the same kind of "
            "machine, number format and thread count gives the same numbers. Elsewhere they are "
            "close, not equal: other CPUs sum in other orders, `--precision auto` trains in "
            "bfloat16 on CPUs that compute it natively (AMX, AMD AVX512_BF16) and on CUDA GPUs "
            "(which also take batch 1024), and one run moves by a few tenths of a point, about "
            "the spread between seeds. The GPU path has not been measured.")


def conv1_words(model_dir):
    """How far training moved filters 16-31 from the negatives of 0-15, from their cosines."""
    weight = C.load_cnn(Path(model_dir) / C.MAIN_MODEL).cnn.conv1.weight.flatten(1)
    cosines = sorted(C.F.cosine_similarity(weight[:16], weight[16:]).tolist())
    close = sum(c < -0.9 for c in cosines)
    return (f"Filters 16-31 start as the negatives of filters 0-15, so in CONV_rslt.png the maps "
            f"of rows 3-4 start as those of rows 1-2 with the sign flipped. Training moved them "
            f"apart only in part (computed by `report` from model/{C.MAIN_MODEL}): {close} of "
            f"the 16 pairs still have a cosine below -0.9 (from {cosines[0]:.2f} to "
            f"{cosines[close - 1] if close else cosines[0]:.2f}; -1 is an exact negative), the "
            f"other {16 - close} from {cosines[close] if close < 16 else cosines[-1]:.2f} to "
            f"{cosines[-1]:.2f}. So most maps of the lower two rows mirror one above them.")


def evidence_rows(records):
    """The figures the report quotes from bench outputs, when they are here: conv1 fixed against
    trained, float32 against bfloat16 at batch 1 (same CPU). [] in a hand-in without bench/."""
    rows = []
    for label, name in EVIDENCE["conv1"]:
        text = (C.ROOT / name).read_text() if (C.ROOT / name).is_file() else ""
        found = re.search(r"final test accuracy: 1 view ([\d.]+)%.*training (\d+) s", text)
        machine = re.search(r"machine: (.*?), \d+ torch", text)
        if found:
            rows.append((f"conv1 {label}", f"{found.group(1)}% test accuracy, seed 0, one view "
                         f"({machine.group(1) if machine else '?'}, bfloat16; {name})"))
    rows += screen_rows()
    path = C.ROOT / EVIDENCE["bfloat16_speed"]
    speed = records["speed"]
    if path.is_file() and speed:
        other = json.loads(path.read_text())
        same = other["machine"]["cpu"] == speed["machine"]["cpu"]
        if same:
            for label, rec in (("float32", speed), ("bfloat16", other)):
                rows.append((f"batch 1 in {label}", ", ".join(
                    f"{m['name']} {m['mean_ms']:.3f} ms ({m.get('layout', '?')})"
                    for m in rec["models"]) + f" ({rec['machine']['cpu']}; "
                    + ("model/records/speed.json" if rec is speed else EVIDENCE["bfloat16_speed"])
                    + ")"))
    return rows


def screen_rows():
    """The screen of variants of the efficient preset on the 5,000 held-out training images
    (bench/screen.py, whose arithmetic it uses): per CPU kind and precision, how many, the best
    paired gain over the preset on 3 seeds, one run's spread; and the test accuracy of those
    confirmed by plain train (bench/confirm.py)."""
    path = C.ROOT / EVIDENCE["screen"]
    if not path.is_file():
        return []
    spec = importlib.util.spec_from_file_location("screen", Path(C.__file__).parent / "bench"
                                                  / "screen.py")
    screen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screen)
    groups, rows = screen.groups_of(screen.read_rows(path)), []
    for kind, precision, _ in [key for key in groups if key[2] == "shipped"]:
        runs = {name: group for (k, p, name), group in groups.items()
                if (k, p) == (kind, precision) and name != "shipped"}
        base = groups[kind, precision, "shipped"]
        gains = {name: screen.paired_mean(group, base, "val_accuracy", lambda a, b: a - b)
                 for name, group in runs.items() if len(group) >= 3 and
                 {r["seed"] for r in group} <= {r["seed"] for r in base}}
        if not gains:
            continue
        best, sd = max(gains, key=gains.get), screen.pooled_sd([*runs.values(), base])
        noise = 2 * sd * (2 / 3) ** 0.5  # two standard errors of a 3-seed mean's difference
        counts = sorted({len(group) for group in runs.values()})
        rows.append(("screen on 5,000 held-out training images", f"{len(runs)} variants of the "
                     f"efficient preset, {counts[0]} to {counts[-1]} seeds each ({base[0]['cpu']}, "
                     f"{precision}); best gain over the preset on 3 seeds {gains[best]:+.2f} "
                     f"points ({best}), one run's standard deviation about {sd:.2f}, so "
                     f"{'within' if gains[best] <= noise else 'beyond'} two standard errors "
                     f"({noise:.2f}); {EVIDENCE['screen']}"))
    for record in sorted((C.ROOT / EVIDENCE["confirm"]).glob(f"*/{C.RESULTS_FILE}")):
        result = json.loads(record.read_text())
        rows.append((f"a screened change trained by plain train: {record.parent.name}", ", ".join(
            f"{run['test_accuracy']:.2f}% test accuracy, seed {run['seed']}"
            for run in result["runs"]) + f" ({record.relative_to(C.ROOT)})"))
    return rows


def image_label(test, source=None):
    """The tested image's name and where it comes from, as the report shows it."""
    name = Path(test["image"]).name
    return f"{name} ({source or IMAGE_SOURCES.get(name, 'the image given to `test`')})"


def summary_rows(records, source=None):
    """The headline rows: of the report's first page and README's results table."""
    rows = []
    if records["results"]:
        results, machine = records["results"], records["results"]["machine"]
        runs, seconds = results["runs"], [r["train_seconds"] for r in results["runs"]]
        main = next(r for r in runs if r["seed"] == results["main_seed"])
        rows += [("machine (training)", f"{machine['cpu']}, {machine['torch_threads']} torch "
                  f"threads, {machine['device']}, {results['precision']}, "
                  f"torch {machine['torch']}"),
                 ("CNN (ours) test accuracy", f"{results['mean']:.2f}% +/- {results['std']:.2f} "
                  f"(mean +/- numpy.std, seeds {', '.join(str(r['seed']) for r in runs)}: "
                  + " / ".join(f"{r['test_accuracy']:.2f}" for r in runs)
                  + f"; {results['epochs']} epochs, preset {results['preset']})"),
                 (f"CNN (ours) shipped, model/{C.MAIN_MODEL}",
                  f"{main['test_accuracy']:.2f}% (seed {main['seed']})"),
                 ("CNN train + evaluation time per seed", f"{np.mean(seconds):.0f} s mean, "
                  f"{max(seconds):.0f} s max" + (" (slowed by other work: see the report's (b))"
                                                 if slow_epochs(results) else ""))]
    if records["test"]:
        rows.append((f"test {image_label(records['test'], source)}",
                     records["test"]["output"][0]))
    if records["resnet20"]:
        rows.append((f"ResNet-20 ({records['resnet20']['weights']})",
                     f"{records['resnet20']['accuracy']:.2f}%"))
    if records["resnet20"] and records["results"]:
        rows.append(("ours against ResNet-20, accuracy", against(records)))
    if records["profile"]:
        rows += [(f"MACs / params: {m['name']}", f"{m['macs']:,} / {m['params']:,}")
                 for m in records["profile"]["models"]]
    if records["speed"]:
        speed = records["speed"]
        rows += [(f"inference, batch 1: {m['name']}", f"{m['mean_ms']:.3f} ms mean "
                  f"({speed['precision']}, {m.get('layout', 'channels_last')}; "
                  f"{speed['machine'].get('gpu') or speed['machine']['cpu']})")
                 for m in speed["models"]]
    return rows


def against(records):
    """Our seeds' accuracy beside ResNet-20's, with the seeds below it named: "beats" is said
    only when every seed beats it."""
    results, theirs = records["results"], records["resnet20"]["accuracy"]
    below = [str(r["seed"]) for r in results["runs"] if r["test_accuracy"] <= theirs]
    verdict = ("every seed above ResNet-20" if not below else
               f"seed{'s' * (len(below) > 1)} {', '.join(below)} at or below ResNet-20")
    return f"{results['mean']:.2f} +/- {results['std']:.2f} vs {theirs:.2f}; {verdict}"


def machine_rows(records):
    """One row per committed `train` run of today's presets: machine, time and accuracy."""
    rows = [("machine", "command", "train + evaluation s per seed (max)", "test accuracy")]
    for results in (records["results"], records["accurate"]):
        if results:
            machine = results["machine"]
            isa = machine.get("onednn_max_cpu_isa")
            where = machine.get("gpu") or machine["cpu"] + (f", ONEDNN_MAX_CPU_ISA={isa}"
                                                            if isa else "")
            runs = results["runs"]
            accuracy = (f"{results['mean']:.2f}% +/- {results['std']:.2f} (n = {len(runs)})"
                        if len(runs) > 1 else f"{runs[0]['test_accuracy']:.2f}% (n = 1)")
            rows.append((f"{where}, {results['precision']}", f"`{results['command']}`",
                         f"{max(r['train_seconds'] for r in runs):.0f}", accuracy))
    return rows


def markdown_table(rows):
    """Rows of cells -> a markdown table whose first row is the header."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


# ----------------------------------------------------------------------------- sections

@dataclass
class Section:
    """One item of the report: its key ("a".."h", or "" for an extra), title, where it comes
    from, and what it shows: terminal screenshots (command, lines), an image, notes, code."""
    key: str
    title: str
    source: str
    screenshots: list = field(default_factory=list)
    image: str = None
    notes: list = field(default_factory=list)
    code: list = None


class Missing(Exception):
    """A record an item needs is missing; the message is the command that makes it."""


def need(records, name, maker):
    if records[name] is None:
        raise Missing(f"{name} is missing: run `{maker}`")
    return records[name]


def log_lines(model_dir):
    """model/train_log.txt as `train` printed it, every line (the block runs over pages)."""
    path = Path(model_dir) / C.LOG_FILE
    if not path.is_file():
        raise Missing(f"{C.LOG_FILE} is missing: run `{TRAIN}`")
    return path.read_text().splitlines()


def seed_lines(model_dir):
    """The end of what `train` printed: the table seed -> test accuracy, mean and std."""
    lines = (Path(model_dir) / C.LOG_FILE).read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("seed  test accuracy")]
    return lines[starts[-1]:] if starts else []


def class_table(run):
    """Per-class test accuracy of one seed, from its confusion matrix in results.json."""
    matrix = np.array(run["confusion_matrix"])
    rows = [f"{'class':<11s} {'accuracy':>8s} {'images':>6s}  most often taken for"]
    for i, name in enumerate(C.CLASSES):
        wrong = matrix[i].copy()
        wrong[i] = -1
        rows.append(f"{name:<11s} {run['per_class_accuracy'][name]:7.1f}% {matrix[i].sum():6d}  "
                    f"{C.CLASSES[wrong.argmax()]} ({wrong.max()})")
    return rows


def sections(model_dir, records, source=None):
    """The report's items (b)-(h), the extras, then (a); Missing for an item lacking a record."""
    results = need(records, "results", TRAIN)
    resnet = need(records, "resnet20", "python CNNclassify.py resnet20")
    profile = need(records, "profile", "python CNNclassify.py profile")
    speed = need(records, "speed", "python CNNclassify.py speed")
    test = need(records, "test", f"python CNNclassify.py test {TEST_IMAGE}")
    out = [Section("b", "(b) Output of training", f"model/{C.LOG_FILE}, every line `train` "
                   "printed; " + made_by(results), [(results["command"], log_lines(model_dir))],
                   notes=[time_words(results)]),
           Section("b", f"(b) Output of testing {image_label(test, source)}",
                   "model/records/test.json, what `test` printed (`--record` kept it for this "
                   "report; `test IMAGE` alone writes nothing into model/); " + made_by(test),
                   [(test["command"], test["output"])]),
           Section("c", f"(c) First conv layer for {Path(test['image']).name} (CONV_rslt.png)",
                   f"the CONV_rslt.png saved by the same run (a copy kept as "
                   f"model/records/{test['figure_copy']})", image="CONV_rslt.png",
                   notes=[CONV1_WORDS, conv1_words(model_dir)]),
           Section("d", "(d) ResNet-20 test accuracy", made_by(resnet) + "; "
                   + weights_words(resnet), [(resnet["command"], resnet["output"])]),
           Section("e", "(e) Train and test accuracy per epoch", made_by(results),
                   image="accuracy.png", notes=[PLOT_WORDS]),
           Section("f", "(f) MACs and parameters (THOP)", made_by(profile) + "; THOP counts "
                   "convolutions, linear layers and BatchNorm, input 1 x 3 x 32 x 32; "
                   + weights_words(profile),
                   [(profile["command"], profile["output"])]),
           Section("g", "(g) Seeds and final test accuracy", "the end of model/"
                   f"{C.LOG_FILE}; " + made_by(results),
                   [(results["command"], seed_lines(model_dir))],
                   notes=["Each seed sets Python's, NumPy's and PyTorch's generators by hand "
                          "(set_seed) and the data order and augmentation (Loader); std is "
                          "numpy.std over the seeds. Against ResNet-20's "
                          f"{resnet['accuracy']:.2f}%: {against(records)}.",
                          time_words(results), reproduction_words(results), CHOSEN_WORDS]),
           Section("h", "(h) Inference time, one image", made_by(speed) + "; "
                   + speed_words(speed) + "; " + weights_words(speed),
                   [(speed["command"], speed["output"])],
                   notes=[f"Both models compute in {speed['precision']}, the format `test` "
                          "uses too: float32 gives the same predictions on every machine, and at "
                          "batch 1 it was about as fast as bfloat16 or faster on every CPU "
                          "measured (the evidence section, where the report has one, gives both "
                          "on this CPU)."])]
    evidence = evidence_rows(records)
    if evidence:
        out.append(Section("", "Beyond the assignment: evidence for the choices above", "figures "
                           "of bench outputs in the project's repository, quoted here so the "
                           "report stands alone (one seed each unless said: a direction, not a "
                           "verdict)",
                           notes=[f"{label}: {value}." for label, value in evidence]))
    main = next(r for r in results["runs"] if r["seed"] == results["main_seed"])
    if "confusion_matrix" in main:
        out.append(Section("", f"Beyond the assignment: where model/{C.MAIN_MODEL} errs",
                           f"the last evaluation of seed {main['seed']} in model/"
                           f"{C.RESULTS_FILE} (its confusion matrix), " + made_by(results),
                           [("", class_table(main))], image=C.CONFUSION_FILE))
    if records["accurate"]:
        points = [f"{label}: {macs:,} MACs per image, {accuracy:.2f}%"
                  + (f", {latency:.3f} ms" if latency else "")
                  + f" (MACs {macs / shipped:.2f}x ours)"
                  for label, macs, accuracy, latency in frontier_points(records)
                  for shipped in [profile["models"][0]["macs"]]]
        machine = records["accurate"]["machine"]
        out.append(Section("", "Beyond the assignment: accuracy against MACs", "drawn by "
                           "`report` from the records above and bench/accurate/"
                           f"{C.RESULTS_FILE} (`train --preset accurate`, trained on "
                           f"{machine.get('gpu') or machine['cpu']}); the accurate preset's MACs "
                           "are counted by `report` (THOP, its widths and views)",
                           image="frontier.png", notes=points))
    code = Path(C.__file__).read_text().splitlines()
    out.append(Section("a", "(a) Code: CNNclassify.py", f"the script itself, {len(code)} lines, "
                       f"sha256 {C.sha256_of(C.__file__)[:12]}", notes=code_map(code),
                       code=code))
    return out


def definitions(code):
    """{top-level function or class name: its first line} of the script."""
    return {node.name: node.lineno for node in ast.parse("\n".join(code)).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def code_map(code, pages=None):
    """Where each item of the assignment is: item, function names, their first lines and, in
    the PDF, the pages they are printed on (`pages`: line -> page, from a first layout)."""
    lines = definitions(code)
    where = {name: f"line {lines[name]}" + ("" if pages is None else
                                             f", page {pages.get(lines[name], '??')}")
             for name in lines}
    return [f"({key}) {what}: " + ", ".join(f"{name} ({where[name]})" for name in names)
            for key, (what, names) in ITEMS.items()]


def frontier_points(records):
    """(label, MACs per image, test accuracy, batch-1 latency in ms or None): ResNet-20, our
    shipped model (its own seed's accuracy) and the accurate preset; latencies from `speed`."""
    speed = {m["name"]: m["mean_ms"] for m in records["speed"]["models"]}
    results, accurate = records["results"], records["accurate"]
    main = next(r for r in results["runs"] if r["seed"] == results["main_seed"])
    macs = C.count_costs(C.ViewAverage(C.build_cnn(C.PRESETS["accurate"]), accurate["views"]))[0]
    return [(f"ResNet-20 ({records['resnet20']['weights']})", records["profile"]["models"][-1]
             ["macs"], records["resnet20"]["accuracy"], speed["ResNet-20"]),
            (f"ours, {results['preset']}, {C.MAIN_MODEL} (seed {main['seed']})",
             records["profile"]["models"][0]["macs"], main["test_accuracy"], speed["CNN (ours)"]),
            (f"ours, accurate ({accurate['views']} views, seed {accurate['runs'][0]['seed']})",
             macs, accurate["runs"][0]["test_accuracy"], None)]


def draw_frontier(points, path):
    """Accuracy against MACs per image (log scale), each point labelled with its latency."""
    fig, ax = C.pyplot().subplots(figsize=(8, 5))
    for label, macs, accuracy, latency in points:
        ax.scatter(macs, accuracy, color="tab:red" if label.startswith("ResNet") else "tab:blue")
        ax.annotate(label + (f", {latency:.2f} ms" if latency else ""), (macs, accuracy),
                    textcoords="offset points", xytext=(7, -3), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(p[1] for p in points) / 2, max(p[1] for p in points) * 8)
    ax.set(xlabel="MACs per image, all test-time views (THOP)", ylabel="test accuracy (%)",
           title="CIFAR-10: accuracy against compute (latency: batch 1, from `speed`)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    C.save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- markdown and PDF

def write_markdown(summary, parts, cover, path):
    out = [f"# {cover[0]}", "", *cover[1:], "", *markdown_table([("item", "result"), *summary])]
    for section in parts:
        out += ["", f"## {section.title}", "", section.source + ".", "", *section.notes]
        out += ["```python", *section.code, "```"] if section.code else []
        for command, lines in section.screenshots:
            out += ["```", *shell(command), *lines, "```"]
        out += [f"![{section.title}]({section.image})"] if section.image else []
    C.write_text(path, "\n".join(out) + "\n")


def shell(command):
    """The prompt line of a terminal block ([] for a table that no command printed)."""
    return [f"$ {command}"] if command else []


def replace_between_markers(text, name, content):
    """Swap what stands between <!-- name:start --> and <!-- name:end --> for content."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text.split(start, 1)[1]:
        raise C.UserError(f"the README has no '{start}' ... '{end}' markers; add them")
    before, rest = text.split(start, 1)
    return f"{before}{start}\n{content}\n{end}{rest.split(end, 1)[1]}"


PAGE_MARGIN = 36       # points, each side of an A4 page
TERMINAL_SIZE = 8      # the smallest type in the report: `train`'s epoch lines fit whole
CODE_SIZE = 8.5


def fonts():
    """DejaVu Sans and Sans Mono (shipped with matplotlib): every character has a glyph, and
    the same records give the same PDF on every machine."""
    from matplotlib import font_manager
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont
    for name, family, weight in [("Sans", "DejaVu Sans", "normal"),
                                 ("Sans-Bold", "DejaVu Sans", "bold"),
                                 ("Mono", "DejaVu Sans Mono", "normal")]:
        if name not in pdfmetrics.getRegisteredFontNames():
            path = font_manager.findfont(font_manager.FontProperties(family=family, weight=weight),
                                         fallback_to_default=False)
            pdfmetrics.registerFont(TTFont(name, path))


def styles():
    from reportlab.lib.styles import ParagraphStyle
    body = ParagraphStyle("body", fontName="Sans", fontSize=10, leading=13.5, spaceAfter=4)
    return {"body": body,
            "title": ParagraphStyle("title", parent=body, fontName="Sans-Bold", fontSize=20,
                                    leading=26, spaceAfter=10),
            "heading": ParagraphStyle("heading", parent=body, fontName="Sans-Bold", fontSize=13,
                                      leading=17, spaceBefore=12, spaceAfter=4, keepWithNext=True),
            "source": ParagraphStyle("source", parent=body, fontSize=8.5, leading=11,
                                     textColor="#555555", keepWithNext=True),
            "terminal": ParagraphStyle("terminal", fontName="Mono", fontSize=TERMINAL_SIZE,
                                       leading=TERMINAL_SIZE * 1.25, textColor="#e8e8e8",
                                       backColor="#1e1e1e", borderPadding=(6, 6, 6, 6),
                                       spaceBefore=8, spaceAfter=12),
            "code": ParagraphStyle("code", fontName="Mono", fontSize=CODE_SIZE,
                                   leading=CODE_SIZE * 1.2)}


def mono_columns(style, width):
    """How many characters of the monospace font fit in `width` points."""
    from reportlab.pdfbase.pdfmetrics import stringWidth
    return int(width // stringWidth("M", style.fontName, style.fontSize))


def wrap(line, width, indent):
    """A line cut into pieces of at most `width` characters, the later ones indented."""
    pieces, line = [], line.expandtabs(4)
    while len(line) > width:
        pieces.append(line[:width])
        line = " " * indent + line[width:]
    return pieces + [line]


def preformatted(rows, style, width, numbered=0):
    """Lines in the monospace style, wrapped to the width (the code with line numbers, the
    first being `numbered`)."""
    from reportlab.platypus import XPreformatted
    from xml.sax.saxutils import escape
    columns = mono_columns(style, width) - 6 * bool(numbered)
    out = []
    for number, line in enumerate(rows, numbered or 1):
        pieces = [escape(p) for p in wrap(line, columns, 4)]
        if numbered:
            pieces = [f'<font color="#888888">{number:5d}</font> ' + pieces[0]] + [
                "      " + p for p in pieces[1:]]
        out += pieces
    return XPreformatted("\n".join(out), style)


def write_pdf(summary, parts, cover, out_dir, path):
    """Page 1: who, what, the items with their pages, the results; then each section, kept on
    one page with its heading where it fits. The code is printed on landscape pages, where every
    line of CNNclassify.py fits whole; the code map gives the page of each function (a first
    layout finds them, the second prints them)."""
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.platypus import (BaseDocTemplate, Flowable, Frame, Image, KeepTogether,
                                    NextPageTemplate, PageBreak, PageTemplate, Paragraph, Spacer,
                                    Table, TableStyle)
    from reportlab.platypus.tableofcontents import TableOfContents
    from xml.sax.saxutils import escape
    fonts()
    s = styles()
    width, wide = A4[0] - 2 * PAGE_MARGIN, landscape(A4)[0] - 2 * PAGE_MARGIN

    class Anchor(Flowable):
        """Takes no room; tells the document the page a line of code is printed on. Where not
        even that line would fit, it asks for more than there is, so it moves with the line."""
        def __init__(self, line):
            super().__init__()
            self.line = line

        def wrap(self, available_width, available_height):
            need = 2 * s["code"].leading
            return 0, (0 if available_height >= need else need)

        def draw(self):
            pass

    def story(pages):
        contents = TableOfContents(dotsMinLevel=0)
        contents.levelStyles = [s["body"]]
        grid = [[Paragraph(escape(str(c)), s["body"]) for c in row]
                for row in [("item", "result"), *summary]]
        table = Table(grid, colWidths=[width * 0.36, width * 0.64])
        table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.4, "#bbbbbb"),
                                   ("BACKGROUND", (0, 0), (-1, 0), "#eeeeee")]))
        out = [Paragraph(escape(cover[0]), s["title"])]
        out += [Paragraph(escape(line), s["body"]) for line in cover[1:]]
        out += [Paragraph("Contents", s["source"]), contents, Spacer(1, 8), table]
        for section in sorted(parts, key=lambda p: (p.key == "a", not p.key, p.key)):
            out += [NextPageTemplate("landscape"), PageBreak()] if section.code else []
            block = [Paragraph(escape(section.title), s["heading"]),
                     Paragraph(escape(section.source), s["source"])]
            notes = code_map(section.code, pages or {}) if section.code else section.notes
            block += [Paragraph(escape(note), s["body"]) for note in notes]
            block += [preformatted([*shell(command), *lines], s["terminal"], width - 12)
                      for command, lines in section.screenshots]
            if section.image:
                image = out_dir / section.image
                w, h = Image(str(image)).imageWidth, Image(str(image)).imageHeight
                scale = min(width / w, A4[1] * 0.5 / h)
                block.append(Image(str(image), width=w * scale, height=h * scale))
            out.append(block[0] if section.code else KeepTogether(block))
            if section.code:
                out += block[1:]
                starts = sorted(definitions(section.code).values())
                for begin, stop in zip([1] + starts, starts + [len(section.code) + 1]):
                    out += [Anchor(begin), preformatted(section.code[begin - 1:stop - 1],
                                                        s["code"], wide, numbered=begin)]
        return out

    def template(name, size):
        def number_page(canvas, doc):
            canvas.setFont("Sans", 8)
            canvas.drawRightString(size[0] - PAGE_MARGIN, PAGE_MARGIN / 2, f"{doc.page}")
        frame = Frame(PAGE_MARGIN, PAGE_MARGIN, size[0] - 2 * PAGE_MARGIN,
                      size[1] - 2 * PAGE_MARGIN, 0, 0, 0, 0)
        return PageTemplate(name, frames=[frame], pagesize=size, onPage=number_page)

    class Document(BaseDocTemplate):
        pages = {}

        def afterFlowable(self, flowable):  # each heading becomes a line of the contents
            if getattr(flowable, "style", None) is s["heading"]:
                self.notify("TOCEntry", (0, flowable.getPlainText(), self.page))
            if isinstance(flowable, Anchor):
                self.pages[flowable.line] = self.page

    def build(target, pages):
        doc = Document(target, pagesize=A4, title="CNNclassify report", author=cover[1],
                       subject=f"CNNclassify.py sha256 {C.sha256_of(C.__file__)}",
                       creator="report/build.py", invariant=1,
                       pageTemplates=[template("portrait", A4), template("landscape",
                                                                         landscape(A4))])
        doc.pages = {}
        doc.multiBuild(story(pages))
        return doc.pages

    pages = build(io.BytesIO(), None)  # where each function lands, then the real layout
    C.write_atomically(path, lambda tmp: build(tmp, pages))


def read_stamp(pdf):
    """report.json beside a report.pdf: {"code_sha256", "author"} of the report ({} if none)."""
    try:
        stamp = json.loads(Path(pdf).with_name("report.json").read_text())
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


def report(model_dir, records_dir, out_dir, author, course=None, readme=None, source=None):
    """report.md and report.pdf in out_dir (and README's tables): every record read and checked
    first; a missing or stale one is a UserError naming the commands to run, and nothing is
    written then, since a partial report is no hand-in. `source`: where the tested image comes
    from, as the report names it."""
    if not (author or "").strip():
        raise C.UserError("--author is required: the student's name goes on the cover")
    out_dir, records_dir = Path(out_dir), Path(records_dir)
    records = read_records(model_dir, records_dir)
    try:
        parts = sections(model_dir, records, source)
    except Missing as error:
        raise C.UserError(f"the report would miss items: {error}") from None
    summary = summary_rows(records, source)
    readme_text = None
    if readme:  # README's tables, made before anything is written
        if not Path(readme).is_file():
            raise C.UserError(f"--readme {readme}: no such file")
        readme_text = replace_between_markers(Path(readme).read_text(), "results", "\n".join(
            markdown_table([("item", "result"), *summary])))
        readme_text = replace_between_markers(readme_text, "machines", "\n".join(
            markdown_table(machine_rows(records))))
    cover = ["CIFAR-10 CNN classifier: report", f"Student: {author.strip()}",
             f"Course: {course or '(course not given)'}; Homework {HOMEWORK}",
             "Every output block below is, byte for byte, what the command above it printed on "
             "stdout, read from the records the commands leave (model/); where it ran and what "
             "it measured is said above each block; what `report` itself computed says so."]
    C.ensure_writable(out_dir)
    copies = {"CONV_rslt.png": records_dir / records["test"]["figure_copy"],
              "accuracy.png": Path(model_dir) / "accuracy.png"}
    if any(p.image == C.CONFUSION_FILE for p in parts):
        copies[C.CONFUSION_FILE] = Path(model_dir) / C.CONFUSION_FILE
    for name, origin in copies.items():
        C.write_atomically(out_dir / name, lambda tmp: shutil.copyfile(origin, tmp))
    if records["accurate"]:
        draw_frontier(frontier_points(records), out_dir / "frontier.png")
    write_markdown(summary, parts, cover, out_dir / "report.md")
    write_pdf(summary, parts, cover, out_dir, out_dir / "report.pdf")
    C.write_json(out_dir / "report.json", {"code_sha256": C.sha256_of(C.__file__),
                                           "author": author.strip()})
    if readme:
        C.write_text(readme, readme_text)
    return [out_dir / "report.md", out_dir / "report.pdf"]


# ----------------------------------------------------------------------------- the hand-in zip

def hand_in_files(root):
    """(path in the zip, file) for what a grader gets: the script, model/ (no subset runs), the
    report PDF, the test images, requirements.txt and README.md."""
    root = Path(root)
    model = [p for p in sorted((root / "model").rglob("*")) if p.is_file()
             and not p.name.startswith(".") and "subset" not in p.relative_to(root).parts]
    files = [root / "CNNclassify.py", *model, root / "report" / "report.pdf",
             *sorted(p for p in (root / "test_images").iterdir() if p.is_file()),
             root / "requirements.txt", root / "README.md"]
    return [(p.relative_to(root).as_posix(), p) for p in files]


def check_hand_in(root, first, last):
    """Refuse (UserError) what must not be handed in: bad name parts, no model, no report or
    one of another CNNclassify.py, or a report that names someone else."""
    for part in (last, first):
        if not NAME_PART.fullmatch(part):
            raise C.UserError(f"'{part}': a name part must be plain letters (hyphens allowed), "
                              "as in Doe Jane")
    root, again = Path(root), f"python report/build.py report --author \"{first} {last}\""
    if not (root / "model" / C.MAIN_MODEL).is_file():
        raise C.UserError(f"{root / 'model' / C.MAIN_MODEL} is missing: run `{TRAIN}`")
    pdf = root / "report" / "report.pdf"
    if not pdf.is_file():
        raise C.UserError(f"{pdf} is missing: run `{again}`")
    stamp = read_stamp(pdf)
    if stamp.get("code_sha256") != C.sha256_of(root / "CNNclassify.py"):
        raise C.UserError(f"{pdf} was built from another CNNclassify.py than the one here: run "
                          f"`{again}` again")
    if stamp.get("author") != f"{first} {last}":
        raise C.UserError(f"{pdf} does not name {first} {last}: run `{again}`")


def build_zip(files):
    """The zip's bytes, files in the given order with fixed dates (same files, same zip)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files:
            if DATASET_NAMES.search(name):
                raise C.UserError(f"{name} looks like CIFAR-10 data, which must never be handed in")
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def prove(zip_path):
    """Unpack the zip into a temporary folder and run `test` on its first image there, as a
    grader would; returns the lines it printed, or a UserError with what went wrong."""
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(folder)
            image = next(n for n in archive.namelist() if n.startswith("test_images/"))
        done = subprocess.run([sys.executable, "CNNclassify.py", "test", image], cwd=folder,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not (Path(folder) / "CONV_rslt.png").is_file():
            raise C.UserError(f"the unpacked zip failed `python CNNclassify.py test {image}` "
                              f"({C.first_line(done.stderr or 'no output')}); it was removed")
        return image, done.stdout.strip().splitlines()


def submit(root, last, first, out_dir):
    """LAST_FIRST_HW2.zip in out_dir, checked (check_hand_in), listed and proved (prove)."""
    check_hand_in(root, first, last)
    files = hand_in_files(root)
    data = build_zip(files)
    if len(data) > MAX_ZIP_BYTES:
        raise C.UserError(f"the zip would be {len(data) / 1e6:.1f} MB, over "
                          f"{MAX_ZIP_BYTES / 1e6:.0f} MB")
    path = Path(out_dir) / f"{last}_{first}_HW{HOMEWORK}.zip"
    C.write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
    lines = [f"{path}: {len(files)} files, {len(data) / 1e6:.1f} MB"]
    lines += [f"  {p.stat().st_size:>12,d}  {name}" for name, p in files]
    try:
        image, output = prove(path)
    except C.UserError:
        path.unlink()
        raise
    lines.append(f"checked: unpacked into a temporary folder, `python CNNclassify.py test "
                 f"{image}` printed '{output[0]}'")
    return lines


def main(argv=None):
    parser = C.Parser(prog="report/build.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=C.Parser)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    p = commands.add_parser("report", help="report/report.md and report.pdf from the records",
                            formatter_class=defaults)
    p.add_argument("--model-dir", default=str(C.MODEL_DIR), help="results.json and the model")
    p.add_argument("--records-dir", default=str(C.RECORDS_DIR), help="the commands' records")
    p.add_argument("--out-dir", default=str(C.ROOT / "report"), help="where the report goes")
    p.add_argument("--author", required=True, help="the student's name on the cover")
    p.add_argument("--image-source", help="where the image of the `test` record comes from, as "
                   "the report names it (e.g. \"my own photo\"); default: "
                   + "; ".join(f"{k}: {v}" for k, v in IMAGE_SOURCES.items()))
    p.add_argument("--course", help="the course's name on the cover")
    p.add_argument("--readme", help="also rewrite the tables between the markers in this README")
    p = commands.add_parser("submit", help="write LAST_FIRST_HW2.zip to hand in, and check that "
                            "it works", formatter_class=defaults)
    p.add_argument("last", help="last name (letters, hyphens allowed)")
    p.add_argument("first", help="first name (letters, hyphens allowed)")
    p.add_argument("--out-dir", default=".", help="where the zip goes")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            written = report(args.model_dir, args.records_dir, args.out_dir, args.author,
                             args.course, args.readme, args.image_source)
            print("wrote " + " and ".join(map(str, written)))
        else:
            print("\n".join(submit(C.ROOT, args.last, args.first, args.out_dir)))
    except C.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files already saved are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
