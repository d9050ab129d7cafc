"""The hand-in tooling beside CNNclassify.py: the report (report.md, report.pdf, README's
tables) built from the records the commands leave, and the zip a student hands in.

    python report/build.py report [--author "First Last"] [--readme README.md]
    python report/build.py submit LAST FIRST [--out-dir .]

It imports CNNclassify (never the other way round), reads the same records and calls the
same functions as the commands themselves, so every number shown comes from a command that
ran. The PDF is laid out by ReportLab: a cover, then the assignment's items (a) to (h) in
order, each command's output drawn like a terminal screenshot. report.json beside the PDF
keeps the sha256 of the CNNclassify.py it prints and the author, which `submit` checks.
"""
import argparse
import dataclasses
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify as C  # noqa: E402

TEST_IMAGE = "car.png"          # the image whose `test` output and conv maps the report shows
MAX_ZIP_BYTES = 50_000_000      # what a course's upload form takes
NAME_PART = re.compile(r"[A-Za-z]+(-[A-Za-z]+)*")
FRONTIER_RUNS = C.ROOT / "bench" / "efficient_results.json"    # bench/efficient.py's runs
FRONTIER_COSTS = C.ROOT / "bench" / "efficient_costs.json"     # and its costs
DATASET_NAMES = re.compile(r"(data_batch_\d|test_batch|batches\.meta|cifar-10.*\.(tar\.gz|zip))$")


# ----------------------------------------------------------------------------- records

def read_record(path, kind=dict):
    """A JSON record as a dict (or `kind`); None if the file is missing; a UserError if it is
    unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise C.UserError(f"{path}: not a readable record ({C.first_line(error)}); rerun the command that made it") from None
    if not isinstance(record, kind):
        raise C.UserError(f"{path}: not a record (a JSON {'object' if kind is dict else 'array'}); "
                          "rerun the command that made it")
    return record


RECORD_KEYS = {  # what each record must hold for the builders; checked before anything runs
    "results": {"command": str, "machine": dict, "runs": list, "mean": float, "std": float, "epochs": int,
                "precision": str},
    "run": {"seed": int, "test_accuracy": float, "train_seconds": float, "images_per_second": float,
            "history": list},
    "profile": {"command": str, "machine": dict, "output": list, "models": list},
    "speed": {"command": str, "machine": dict, "output": list, "models": list},
    "evaluate": {"command": str, "machine": dict, "output": list, "confusion": list, "accuracy": float},
    "resnet20": {"command": str, "machine": dict, "output": list, "weights": str, "accuracy": float},
}


def check_record(record, kind, path):
    """The record itself (None if missing), or a UserError naming the first key that is absent
    or of the wrong type."""
    if record is None:
        return None
    for key, kind_of in RECORD_KEYS[kind].items():
        value = record.get(key)
        if not isinstance(value, (int, float) if kind_of is float else kind_of) or isinstance(value, bool):
            raise C.UserError(f"{path}: a record is malformed ('{key}' should be a {kind_of.__name__}); "
                              "rerun the command that made it")
    if kind == "results":
        for run in record["runs"]:
            check_record(run if isinstance(run, dict) else {}, "run", path)
    return record


def read_records(model_dir, records_dir):
    """Every record the report is built from, read and checked: {name: record or None}."""
    model_dir, records_dir = Path(model_dir), Path(records_dir)
    paths = {"results": model_dir / C.RESULTS_FILE, "profile": records_dir / "profile.json",
             "speed": records_dir / "speed.json", "evaluate": records_dir / "evaluate.json"}
    records = {name: check_record(read_record(path), name, path) for name, path in paths.items()}
    records["resnet20"] = [check_record(read_record(p), "resnet20", p) for p in sorted(records_dir.glob("resnet20_*.json"))]
    machine_files = [model_dir / C.RESULTS_FILE, *sorted((C.ROOT / "bench" / "machines").glob("*.json"))]
    records["machines"] = [check_record(read_record(p), "results", p) for p in machine_files if p.exists()]
    records["bench_runs"] = read_record(FRONTIER_RUNS, list) or []
    records["bench_costs"] = read_record(FRONTIER_COSTS) or {}
    return records


def made_by(rec):
    machine = rec["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['torch_threads']} threads"
    return f"made by `{rec['command']}` on {where} ({machine['device']}), torch {machine['torch']}"


def machine_class(machine):
    """How a record's machine computes: what decides the speed of `train` there."""
    if machine.get("gpu"):
        return f"GPU ({machine['gpu']})"
    isa = machine.get("onednn_max_cpu_isa")
    where = machine["cpu"] + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "")
    native = machine.get("precision", machine.get("precision_auto")) == "bfloat16"
    return f"CPU {'with' if native else 'without'} native bfloat16 ({where})"


def seconds_to_reach(history, accuracy):
    """Training seconds at the end of the first epoch whose test accuracy reaches `accuracy`."""
    return next((h["seconds"] for h in history if h["test_accuracy"] >= accuracy), None)


def summary_rows(results):
    """The headline rows of a training run's results."""
    runs, machine = results["runs"], results["machine"]
    seconds = [r["train_seconds"] for r in runs]
    views = results.get("views", 6)
    reached = [seconds_to_reach(r["history"], 75.0) for r in runs]
    return [("machine (training)", f"{machine['cpu']}, {machine['cpu_count']} cores, {machine['torch_threads']} "
             f"torch threads, {machine['device']}, {results['precision']}, torch {machine['torch']}"),
            ("CNN (ours) test accuracy", f"{results['mean']:.2f}% +/- {results['std']:.2f} (mean +/- numpy.std, "
             f"seeds {', '.join(str(r['seed']) for r in runs)}; {results['epochs']} epochs, "
             f"preset {results.get('preset', 'accurate')}, {views} test-time view{'s' * (views > 1)})"),
            ("CNN training time per seed", f"{np.mean(seconds):.0f} s mean, {max(seconds):.0f} s max "
             f"({np.mean([r['images_per_second'] for r in runs]):.0f} images/s)"),
            ("CNN first epoch end at >= 75% test accuracy", "not reached by every seed" if None in reached
             else f"{max(reached):.0f} s at most ({', '.join(f'{t:.0f}' for t in reached)} s)")]


EARLIER_WIDTHS = [64, 128, 256]  # of every results.json made before the recipe was recorded in it


def machine_rows(machines):
    """One row per kind of machine that ran `train`: the widths, seconds per seed and accuracy."""
    rows = [("machine", "command", "widths", "epochs", "s per seed (max)", "test accuracy")]
    for results in machines:
        if results:
            widths = "/".join(map(str, results.get("recipe", {}).get("widths", EARLIER_WIDTHS)))
            rows.append((machine_class(results["machine"]), f"`{results['command']}`", widths, str(results["epochs"]),
                         f"{max(r['train_seconds'] for r in results['runs']):.0f}",
                         f"{results['mean']:.2f}%" + (f" +/- {results['std']:.2f}" if len(results["runs"]) > 1 else "")))
    return rows


def markdown_table(rows):
    """Rows of cells -> a markdown table whose first row is the header."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


# ----------------------------------------------------------------------------- sections (a) to (h)

@dataclass
class Section:
    """One item of the report: a title, where it comes from, and what it shows: terminal
    screenshots (command, output lines), an image, a listing of the code, plain notes."""
    title: str
    source: str
    screenshots: list = field(default_factory=list)   # [(command, [lines])]
    image: str = None                                 # file name in the report folder
    code: list = None                                 # lines of CNNclassify.py
    notes: list = field(default_factory=list)
    in_readme: bool = True


class Missing(Exception):
    """A record an item needs is missing; the message is the command that makes it."""


def need(record, path, maker):
    if record is None:
        raise Missing(f"{Path(path).name} is missing: run `{maker}`")
    return record


def code_section(ctx):
    code = Path(C.__file__).read_text().splitlines()
    return Section("(a) Code: CNNclassify.py", f"the script itself, {len(code)} lines, sha256 {C.sha256_of(C.__file__)}",
                   code=code, in_readme=False)


TRAIN = "python CNNclassify.py train --seeds 0 1 2"


def tested(ctx):
    if "test" not in ctx:
        raise Missing(f"{C.MAIN_MODEL} is missing: run `python CNNclassify.py train`")
    return ctx["test"]


def training_section(ctx):
    results = need(ctx["results"], C.RESULTS_FILE, TRAIN)
    epochs = len(results["runs"][0]["history"])
    lines = [C.epoch_line(r["seed"], h, epochs) for r in results["runs"] for h in r["history"]] + C.seed_table(results)
    return Section("(b) Output of training", made_by(results), [(results["command"], lines)], in_readme=False)


def testing_section(ctx):
    lines = tested(ctx)[0]
    return Section("(b) Output of testing an image", "made by `report`, running `test` on the model in model/",
                   [(f"python CNNclassify.py test {TEST_IMAGE}", lines)])


def conv_section(ctx):
    tested(ctx)
    return Section(f"(c) First conv layer for {TEST_IMAGE} (CONV_rslt.png)", "made by the same run",
                   image="CONV_rslt.png")


def resnet_section(ctx):
    records = ctx["resnet20"]
    if not records:
        raise Missing("resnet20_*.json is missing: run `python CNNclassify.py resnet20`")
    return Section("(d) ResNet-20 test accuracy", "; ".join(made_by(r) for r in records),
                   [(r["command"], r["output"]) for r in records])


def plot_section(ctx):
    if not (ctx["model_dir"] / "accuracy.png").exists():
        raise Missing(f"accuracy.png is missing: run `{TRAIN}`")
    return Section("(e) Train and test accuracy per epoch", made_by(need(ctx["results"], C.RESULTS_FILE, TRAIN)),
                   image="accuracy.png")


def costs_section(ctx):
    rec = need(ctx["profile"], "profile.json", "python CNNclassify.py profile")
    return Section("(f) MACs and parameters (THOP)", made_by(rec), [(rec["command"], rec["output"])])


def seeds_section(ctx):
    results = need(ctx["results"], C.RESULTS_FILE, TRAIN)
    return Section("(g) Seeds and final test accuracy", made_by(results), [(results["command"], C.seed_table(results))],
                   notes=["Each seed sets Python's, NumPy's and PyTorch's generators by hand (set_seed) and the "
                          "data order, flips and translations (Loader); std is numpy.std over the seeds."])


def speed_section(ctx):
    rec = need(ctx["speed"], "speed.json", "python CNNclassify.py speed")
    return Section("(h) Inference time, one image", made_by(rec), [(rec["command"], rec["output"])])


BENCH_COMMAND = "python bench/efficient.py --train / --costs"


def frontier_points(ctx):
    """(label, MACs per image, test accuracy, latency in ms or None) of every measured model:
    both ResNet-20s, the shipped model, and each trained candidate at 1, 2 and 6 views (mean
    over its seeds). MACs are THOP's (recounted from the architecture, no weights needed);
    latencies are batch-1 float32 means from the costs bench, the shipped ones from `speed`."""
    costs = {row["candidate"]: row for row in ctx["bench_costs"].get("candidates", [])}
    points = []
    for rec in ctx["resnet20"]:
        option = rec.get("option", "A" if "12fca82f" in str(rec["weights"]) else "B")
        macs = C.count_costs(C.ResNet20(option, C.CIFAR_MEAN, C.CIFAR_STD))[0]
        latency = ctx["bench_costs"].get(f"resnet20_option{option}_ms")
        points.append((f"ResNet-20 ({Path(rec['weights']).name})", macs, rec["accuracy"], latency))
    if ctx["results"] and ctx["profile"] and ctx["speed"]:
        timed = {m["name"]: m["mean_ms"] for m in ctx["speed"]["models"]}
        shipped_ms = timed.get("CNN, float32", ctx["speed"]["models"][0]["mean_ms"])  # the picture's format
        points.append((f"shipped ({ctx['results'].get('preset', 'accurate')})", ctx["profile"]["models"][0]["macs"],
                       ctx["results"]["mean"], shipped_ms))
    runs = ctx["bench_runs"]
    for name in dict.fromkeys(run["candidate"] for run in runs):
        mine = [run for run in runs if run["candidate"] == name]
        macs = C.count_costs(C.build_cnn(dataclasses.replace(C.RECIPE, widths=tuple(mine[0]["widths"]))))[0]
        seeds = len(mine)
        for views in ("1", "2", "6"):
            accuracy = float(np.mean([run["accuracy_by_views"][views] for run in mine]))
            latency = costs.get(name, {}).get("ms_float32", {}).get(views)
            points.append((f"{name}, {views} view{'s' * (views != '1')} ({seeds} seed{'s' * (seeds > 1)})",
                           macs * int(views), accuracy, latency))
    return points


def draw_frontier(points, path):
    """Accuracy against MACs per image (log scale), each point labelled with its latency: the
    ResNet-20s in red, labelled on their left; the shipped model a green star."""
    fig, ax = C.pyplot().subplots(figsize=(10, 6))
    for label, macs, accuracy, latency in points:
        text = label + (f", {latency:.2f} ms" if latency else "")
        resnet, shipped = label.startswith("ResNet"), label.startswith("shipped")
        ax.scatter(macs, accuracy, color="tab:red" if resnet else "tab:green" if shipped else "tab:blue",
                   marker="*" if shipped else "o", s=160 if shipped else 40, zorder=4 if shipped else 3)
        ax.annotate(text, (macs, accuracy), textcoords="offset points", fontsize=6.5, va="center",
                    xytext=(-7, 0) if resnet else (7, -8) if shipped else (7, 0), ha="right" if resnet else "left")
    ax.set_xscale("log")
    ax.set_xlim(min(p[1] for p in points) / 4, max(p[1] for p in points) * 2.5)
    ax.set(xlabel="MACs per image, all test-time views (THOP, log scale)", ylabel="test accuracy (%)",
           title="CIFAR-10: accuracy against compute (latency: batch 1, float32)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    C.save_figure(fig, path, dpi=120)


def frontier_section(ctx):
    """Beyond the assignment: every measured model on accuracy against MACs (the frontier)."""
    if not ctx["bench_runs"]:
        return None
    lines = [f"{label:<58s} {macs / 1e6:8.1f} M {accuracy:6.2f}%" + (f" {latency:6.2f} ms" if latency else "")
             for label, macs, accuracy, latency in ctx["frontier"]]
    return Section("Beyond the assignment: accuracy against MACs", f"drawn from bench/{FRONTIER_RUNS.name}, "
                   f"bench/{FRONTIER_COSTS.name} and the records above (made by `{BENCH_COMMAND}`)",
                   [("points: model, MACs per image, test accuracy, latency", lines)], image="frontier.png")


def beyond_section(ctx):
    """Beyond the assignment, so optional: where the model errs, from `evaluate`'s record."""
    rec = ctx["evaluate"]
    return rec and Section("Beyond the assignment: accuracy per class and the confusion matrix", made_by(rec),
                           [(rec["command"], rec["output"])], image="confusion.png")


BUILDERS = [code_section, training_section, testing_section, conv_section, resnet_section, plot_section,
            costs_section, seeds_section, speed_section, frontier_section, beyond_section]


def weakest_class(rec):
    """The class our CNN gets right least often, from `evaluate`'s confusion matrix."""
    confusion = np.array(rec["confusion"])
    shares = 100 * confusion.diagonal() / confusion.sum(1)
    return f"{C.CLASSES[int(shares.argmin())]}: {shares.min():.1f}% of its test images (best: " \
           f"{C.CLASSES[int(shares.argmax())]}, {shares.max():.1f}%)"


def collect(model_dir, records, test):
    """The report's summary rows, sections (a)-(h) and figures {name: draw(path)}, from the
    checked records (writing nothing), and the commands that make what is missing. `test` is
    what `test car.png` gave on the main model: its lines and figure, or None without a model."""
    model_dir = Path(model_dir)
    results = records["results"]
    ctx = {"model_dir": model_dir, **records}
    missing, figures, summary = [], {}, []
    if test:
        ctx["test"] = test
        figures["CONV_rslt.png"] = lambda path: C.draw_conv_maps(*test[1], path)
    if (model_dir / "accuracy.png").exists():
        figures["accuracy.png"] = lambda path: C.write_atomically(
            path, lambda tmp: shutil.copyfile(model_dir / "accuracy.png", tmp))
    if ctx["bench_runs"]:
        ctx["frontier"] = frontier_points(ctx)
        figures["frontier.png"] = lambda path: draw_frontier(ctx["frontier"], path)
    if ctx["evaluate"]:
        confusion = torch.tensor(ctx["evaluate"]["confusion"])
        figures["confusion.png"] = lambda path: C.draw_confusion(confusion, f"CIFAR-10 test set, {C.MAIN_MODEL}: "
                                                                 f"{ctx['evaluate']['accuracy']:.2f}%", path)
    sections = []
    for build in BUILDERS:
        try:
            sections.append(build(ctx))
        except Missing as error:
            missing.append(str(error))
    sections = [section for section in sections if section]
    if results:
        summary += summary_rows(results)
    if "test" in ctx:
        summary.append((f"test {TEST_IMAGE}", ctx["test"][0][0]))
    summary += [(f"ResNet-20 ({Path(r['weights']).name})", f"{r['accuracy']:.2f}%") for r in ctx["resnet20"]]
    if ctx["profile"]:
        summary += [(f"MACs / params: {m['name']}", f"{m['macs']:,} / {m['params']:,}") for m in ctx["profile"]["models"]]
    if ctx["speed"]:
        summary += [(f"inference: {m['name']}", f"{m['mean_ms']:.3f} ms mean per image") for m in ctx["speed"]["models"]]
    if ctx["evaluate"]:
        summary.append(("CNN (ours): weakest class", weakest_class(ctx["evaluate"])))
    return summary, sections, figures, sorted(set(missing))


# ----------------------------------------------------------------------------- markdown and README

def write_markdown(summary, sections, author, path):
    out = ["# CNNclassify report" + (f": {author}" if author else ""), "",
           "Built by `python report/build.py report` from the records of the commands below; no number is "
           "typed by hand.", "", *markdown_table([("item", "result"), *summary])]
    for section in sections:
        out += ["", f"## {section.title}", "", section.source + ".", ""]
        if section.code:
            out += ["```python", *section.code, "```"]
        for command, lines in section.screenshots:
            out += ["```", f"$ {command}", *lines, "```"]
        out += [f"![{section.title}]({section.image})"] if section.image else []
        out += section.notes
    C.write_atomically(path, lambda tmp: Path(tmp).write_text("\n".join(out) + "\n"))


def replace_between_markers(text, name, content):
    """Swap what stands between <!-- name:start --> and <!-- name:end --> for content."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text.split(start, 1)[1]:
        raise C.UserError(f"the README has no '{start}' ... '{end}' markers; add them where the table goes")
    before, rest = text.split(start, 1)
    return f"{before}{start}\n{content}\n{end}{rest.split(end, 1)[1]}"


def readme_with_tables(summary, machines, path):
    """README's text with its results and machine tables rewritten, so it never re-types a number."""
    if not path.is_file():
        raise C.UserError(f"--readme {path}: no such file")
    text = replace_between_markers(path.read_text(), "results", "\n".join(markdown_table([("item", "result"), *summary])))
    return replace_between_markers(text, "machines", "\n".join(markdown_table(machines)))


# ----------------------------------------------------------------------------- PDF

PAGE_MARGIN = 36       # points, each side of an A4 page
BODY_SIZE = 10
TERMINAL_SIZE = 8      # the smallest type in the report: 106 columns, so `train`'s epoch lines fit
CODE_SIZE = 8.5


def fonts():
    """DejaVu Sans and Sans Mono (shipped with matplotlib): every character of the code and
    outputs has a glyph, and the same file gives the same PDF on every machine."""
    from matplotlib import font_manager
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont
    for name, family, weight in [("Sans", "DejaVu Sans", "normal"), ("Sans-Bold", "DejaVu Sans", "bold"),
                                 ("Mono", "DejaVu Sans Mono", "normal"), ("Mono-Bold", "DejaVu Sans Mono", "bold")]:
        if name not in pdfmetrics.getRegisteredFontNames():
            path = font_manager.findfont(font_manager.FontProperties(family=family, weight=weight), fallback_to_default=False)
            pdfmetrics.registerFont(TTFont(name, path))


def wrap(line, width, indent):
    """A line cut into pieces of at most `width` characters, the later ones indented."""
    pieces, line = [], line.expandtabs(4)
    while len(line) > width:
        pieces.append(line[:width])
        line = " " * indent + line[width:]
    return pieces + [line]


def styles():
    from reportlab.lib.styles import ParagraphStyle
    body = ParagraphStyle("body", fontName="Sans", fontSize=BODY_SIZE, leading=BODY_SIZE * 1.35, spaceAfter=4)
    return {"body": body,
            "title": ParagraphStyle("title", parent=body, fontName="Sans-Bold", fontSize=20, leading=26, spaceAfter=10),
            "heading": ParagraphStyle("heading", parent=body, fontName="Sans-Bold", fontSize=13, leading=17,
                                      spaceBefore=12, spaceAfter=4, keepWithNext=True),
            "source": ParagraphStyle("source", parent=body, fontSize=8.5, leading=11, textColor="#555555",
                                     keepWithNext=True),
            "terminal": ParagraphStyle("terminal", fontName="Mono", fontSize=TERMINAL_SIZE, leading=TERMINAL_SIZE * 1.25,
                                       textColor="#e8e8e8", backColor="#1e1e1e", borderPadding=(6, 6, 6, 6),
                                       spaceBefore=8, spaceAfter=12),
            "code": ParagraphStyle("code", fontName="Mono", fontSize=CODE_SIZE, leading=CODE_SIZE * 1.2)}


def mono_columns(style, width):
    """How many characters of the monospace font fit in `width` points."""
    from reportlab.pdfbase.pdfmetrics import stringWidth
    return int(width // stringWidth("M", style.fontName, style.fontSize))


def terminal(command, lines, style, width):
    """A command and its output as a terminal shows them: prompt, text, dark panel."""
    from reportlab.platypus import XPreformatted
    from xml.sax.saxutils import escape
    columns = mono_columns(style, width - 12)
    prompt = [f'<font color="#7ee787">{escape(piece)}</font>' for piece in wrap(f"$ {command}", columns, 4)]
    output = [escape(piece) for line in lines for piece in wrap(line, columns, 4)]
    return XPreformatted("\n".join(prompt + output), style)


def code_listing(code, style, width):
    """The code with line numbers, lines longer than the page wrapped (none are, on the
    landscape pages write_pdf prints it on), as one flowable that splits across pages."""
    from reportlab.platypus import XPreformatted
    from xml.sax.saxutils import escape
    columns = mono_columns(style, width)
    rows = []
    for number, line in enumerate(code, 1):
        pieces = wrap(line, columns - 6, 4)
        rows.append(f'<font color="#888888">{number:5d}</font> ' + escape(pieces[0]))
        rows += ["      " + escape(piece) for piece in pieces[1:]]
    return XPreformatted("\n".join(rows), style)


def figure(path, width, max_height):
    from reportlab.platypus import Image
    from reportlab.lib.utils import ImageReader
    w, h = ImageReader(str(path)).getSize()
    scale = min(width / w, max_height / h)
    return Image(str(path), width=w * scale, height=h * scale)


def table(rows, style, width):
    from reportlab.platypus import Paragraph, Table, TableStyle
    from xml.sax.saxutils import escape
    cells = [[Paragraph(escape(str(c)), style) for c in row] for row in rows]
    out = Table(cells, colWidths=[width * 0.36, width * 0.64])
    out.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.4, "#bbbbbb"), ("BACKGROUND", (0, 0), (-1, 0), "#eeeeee"),
                             ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    return out


def write_pdf(summary, sections, out_dir, author, path):
    """Cover (title, author, results), then (a) to (h), on A4, type 8 pt and larger. The code
    is printed on landscape pages, where every line of CNNclassify.py fits whole, so the
    listing is the file line for line; everything else is portrait."""
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.platypus import (BaseDocTemplate, Frame, NextPageTemplate, PageBreak, PageTemplate, Paragraph,
                                    Spacer)
    from xml.sax.saxutils import escape
    fonts()
    s = styles()
    width, wide = A4[0] - 2 * PAGE_MARGIN, landscape(A4)[0] - 2 * PAGE_MARGIN
    story = [Paragraph("CIFAR-10 CNN classifier: report", s["title"])]
    if author:
        story.append(Paragraph(escape(author), s["heading"]))
    story += [Paragraph("Every number, output and figure below was made by `CNNclassify.py` and read from the "
                        "records its commands leave; the commands are shown with each output.", s["body"]),
              Spacer(1, 6), table([("item", "result"), *summary], s["body"], width)]
    for section in sections:
        if section.code:
            story += [NextPageTemplate("landscape"), PageBreak()]
        story += [Paragraph(escape(section.title), s["heading"]), Paragraph(escape(section.source), s["source"])]
        story += [Paragraph(escape(note), s["body"]) for note in section.notes]
        for command, lines in section.screenshots:
            story.append(terminal(command, lines, s["terminal"], width))
        if section.image:
            story.append(figure(out_dir / section.image, width, A4[1] * 0.55))
        if section.code:
            story += [code_listing(section.code, s["code"], wide), NextPageTemplate("portrait"), PageBreak()]

    def template(name, size):
        def number_page(canvas, doc):
            canvas.setFont("Sans", 8)
            canvas.drawRightString(size[0] - PAGE_MARGIN, PAGE_MARGIN / 2, f"{doc.page}")
        frame = Frame(PAGE_MARGIN, PAGE_MARGIN, size[0] - 2 * PAGE_MARGIN, size[1] - 2 * PAGE_MARGIN,
                      leftPadding=0, rightPadding=0, topPadding=0, bottomPadding=0)
        return PageTemplate(name, frames=[frame], pagesize=size, onPage=number_page)

    def write(tmp):
        doc = BaseDocTemplate(tmp, pagesize=A4, title="CNNclassify report", author=author or "",
                              subject=f"CNNclassify.py sha256 {C.sha256_of(C.__file__)}",
                              creator="CNNclassify.py report", invariant=1,
                              pageTemplates=[template("portrait", A4), template("landscape", landscape(A4))])
        doc.build(story)
    C.write_atomically(path, write)


def read_stamp(pdf):
    """report.json beside a report.pdf: {"code_sha256", "author"} of the report ({} if none)."""
    try:
        stamp = json.loads(Path(pdf).with_name("report.json").read_text())
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- report command

def report(model_dir, records_dir, out_dir, author=None, readme=None):
    """report.md and report.pdf in out_dir (and README's tables): every item read and checked
    first; a missing item is a UserError naming the commands that make it, and nothing is
    written then, since a partial report is no hand-in."""
    out_dir, main_model = Path(out_dir), Path(model_dir) / C.MAIN_MODEL
    records = read_records(model_dir, records_dir)  # checked before any model runs
    test = C.classify_image(C.IMAGE_DIR / TEST_IMAGE, C.load_cnn(main_model)) if main_model.exists() else None
    summary, sections, figures, missing = collect(model_dir, records, test)
    machines = machine_rows(records["machines"])
    if missing:
        raise C.UserError("the report would miss items: " + "; ".join(missing))
    readme_text = readme and readme_with_tables(summary, machines, Path(readme))  # before anything is written
    C.ensure_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in figures.items():
        draw(out_dir / name)
    write_markdown(summary, sections, author, out_dir / "report.md")
    write_pdf(summary, sections, out_dir, author, out_dir / "report.pdf")
    C.write_json(out_dir / "report.json", {"code_sha256": C.sha256_of(C.__file__), "author": author or ""})
    if readme:
        C.write_atomically(readme, lambda tmp: Path(tmp).write_text(readme_text))
    return [out_dir / "report.md", out_dir / "report.pdf"]


# ----------------------------------------------------------------------------- the hand-in zip

def hand_in_files(root):
    """(path in the zip, file) for what a grader gets: the script, model/ (no subset or scratch
    runs), the report PDF, the test images, requirements.txt and README.md."""
    root = Path(root)
    model = [p for p in sorted((root / "model").rglob("*")) if p.is_file() and not p.name.startswith((".", "progress_"))
             and "subset" not in p.relative_to(root / "model").parts]
    files = [root / "CNNclassify.py", *model, root / "report" / "report.pdf",
             *sorted(p for p in (root / "test_images").iterdir() if p.is_file()),
             root / "requirements.txt", root / "README.md"]
    return [(p.relative_to(root).as_posix(), p) for p in files]


def check_hand_in(root, first, last):
    """Refuse (UserError) what must not be handed in: bad name parts, no model, no report or
    one of another CNNclassify.py, or a report that names someone else."""
    for part in (last, first):
        if not NAME_PART.fullmatch(part):
            raise C.UserError(f"'{part}': a name part must be plain letters (hyphens allowed), as in Potter Harry")
    root = Path(root)
    if not (root / "model" / C.MAIN_MODEL).is_file():
        raise C.UserError(f"{root / 'model' / C.MAIN_MODEL} is missing: run `python CNNclassify.py train --seeds 0 1 2`")
    pdf = root / "report" / "report.pdf"
    if not pdf.is_file():
        raise C.UserError(f"{pdf} is missing: run `python report/build.py report --author \"{first} {last}\"`")
    stamp = read_stamp(pdf)
    if stamp.get("code_sha256") != C.sha256_of(root / "CNNclassify.py"):
        raise C.UserError(f"{pdf} was built from another CNNclassify.py than the one here: run "
                          f"`python report/build.py report --author \"{first} {last}\"` again")
    if stamp.get("author") != f"{first} {last}":
        raise C.UserError(f"{pdf} does not name {first} {last}: run `python report/build.py report --author \"{first} {last}\"`")


def build_zip(files):
    """The zip's bytes, files in the given order with fixed dates (same files, same zip)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in files:
            if DATASET_NAMES.search(name):
                raise C.UserError(f"{name} looks like CIFAR-10 data, which must never be handed in")
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def prove(zip_path):
    """Unpack the zip into a temporary folder and run `test` on its first image there, as a
    grader would; returns the lines it printed, or a UserError with what went wrong."""
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(folder)
            image = next(n for n in archive.namelist() if n.startswith("test_images/"))
        done = subprocess.run([sys.executable, "CNNclassify.py", "test", image, "--out", "CONV_rslt.png"],
                              cwd=folder, capture_output=True, text=True, timeout=600)
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
        raise C.UserError(f"the zip would be {C.megabytes(len(data))}, over {C.megabytes(MAX_ZIP_BYTES)}")
    path = Path(out_dir) / f"{last}_{first}_HW2.zip"
    C.ensure_writable(path.parent)
    C.write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
    lines = [f"{path}: {len(files)} files, {C.megabytes(len(data))}"]
    lines += [f"  {p.stat().st_size:>12,d}  {name}" for name, p in files]
    try:
        image, output = prove(path)
    except C.UserError:
        path.unlink()
        raise
    lines.append(f"checked: unpacked into a temporary folder, `python CNNclassify.py test {image}` printed "
                 f"'{output[0]}'")
    return lines


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = C.Parser(prog="report/build.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=C.Parser)
    p = commands.add_parser("report", help="report/report.md and report.pdf from the records", formatter_class=C.HelpFormatter)
    p.add_argument("--model-dir", default=str(C.MODEL_DIR), help="where results.json and the model are")
    p.add_argument("--records-dir", default=str(C.RECORDS_DIR), help="where the commands recorded their results")
    p.add_argument("--out-dir", default=str(C.ROOT / "report"), help="where the report goes")
    p.add_argument("--author", help="the student's name on the cover, e.g. \"Harry Potter\"")
    p.add_argument("--readme", help="also rewrite the tables between the markers in this README")
    p = commands.add_parser("submit", help="write LAST_FIRST_HW2.zip to hand in, and check that it works",
                            formatter_class=C.HelpFormatter)
    p.add_argument("last", help="last name (letters, hyphens allowed)")
    p.add_argument("first", help="first name (letters, hyphens allowed)")
    p.add_argument("--out-dir", default=".", help="where the zip goes")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            written = report(args.model_dir, args.records_dir, args.out_dir, args.author, args.readme)
            print("wrote " + " and ".join(map(str, written)))
        else:
            print("\n".join(submit(C.ROOT, args.last, args.first, args.out_dir)))
    except C.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); files already saved are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
