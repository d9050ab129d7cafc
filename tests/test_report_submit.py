"""`report` (report/build.py) and `submit`: the hand-in a grader gets."""
import contextlib
import hashlib
import io
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import CNNclassify as C
from conftest import CIFAR_DIR, ROOT, make_fake_cifar

sys.path.insert(0, str(ROOT / "report"))
import build  # noqa: E402


def run_build(*args, cwd=ROOT):
    """report/build.py as a user runs it: a fresh process, its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "report/build.py", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def make_records(folder):
    """The records the report is built from, made by the real commands on small synthetic data,
    in the formats they write today: train (seeds 0 1 2, one step each on 64 fake images),
    resnet20 (the course's weights, on those images), profile, speed (2 timed calls) and
    `test chelsea.png --record`. Returns the folders and what each command printed."""
    make_fake_cifar(folder / "data" / C.CIFAR_FOLDER)
    data, model_dir, records = folder / "data", folder / "model", folder / "model" / "records"
    model = ("--model", model_dir / "cnn.pt")
    commands = {"train": ("train", "--epochs", "1", "--subset", "64", "--data-dir", data, "--model-dir", model_dir,
                          "--device", "cpu"),
                "resnet20": ("resnet20", "--data-dir", data, "--records-dir", records, "--device", "cpu"),
                "profile": ("profile", *model, "--records-dir", records),
                "speed": ("speed", *model, "--iterations", "2", "--warmup", "1", "--records-dir", records,
                          "--device", "cpu"),
                "test": ("test", "chelsea.png", *model, "--out", folder / "CONV_rslt.png", "--records-dir", records,
                         "--record", "--device", "cpu")}
    printed = {}
    for name, args in commands.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert C.main([str(a) for a in args]) == 0, name
        printed[name] = out.getvalue()
    return model_dir, records, printed


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """make_records once, and a report built from them (shared: tests copy what they change)."""
    folder = tmp_path_factory.mktemp("made")
    model_dir, records, printed = make_records(folder)
    readme = folder / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold table\n<!-- results:end -->\noutro\n"
                      "<!-- machines:start -->\nold machines\n<!-- machines:end -->\n")
    result = report(model_dir, records, folder / "report", "--author", "Jane Doe", "--course", "Deep Learning",
                    "--readme", readme)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return folder, printed


def copy_made(made, tmp_path):
    """A copy of the made folder to change: (model dir, records dir)."""
    shutil.copytree(made[0], tmp_path / "made", symlinks=True)
    return tmp_path / "made" / "model", tmp_path / "made" / "model" / "records"


def report(model_dir, records, out, *more):
    author = () if "--author" in more else ("--author", "Jane Doe")
    return run_build("report", "--model-dir", model_dir, "--records-dir", records, "--out-dir", out, *author, *more)


def test_report_builds_markdown_and_pdf_from_records(made, tmp_path):
    folder, printed = made
    model_dir, records, out = folder / "model", folder / "model" / "records", folder / "report"
    updated = (folder / "README.md").read_text()
    assert updated.startswith("intro\n<!-- results:start -->\n| item | result |")
    assert updated.endswith("<!-- machines:end -->\n") and "<!-- results:end -->\noutro\n" in updated
    resnet = json.loads((records / "resnet20.json").read_text())
    results = json.loads((model_dir / "results.json").read_text())
    assert "old table" not in updated and f"| ResNet-20 (resnet20_cifar10_pretrained.pt) | {resnet['accuracy']:.2f}% |" in updated
    assert "old machines" not in updated and "| machine | command | train + evaluation s per seed (max) |" in updated
    assert f"{results['mean']:.2f}% +/- {results['std']:.2f} (n = 3)" in updated
    assert ("| test chelsea.png (a photograph from scikit-image's sample data, not CIFAR-10) | "
            "prediction result: ") in updated
    assert f"| ours against ResNet-20, accuracy | {build.against(build.read_records(model_dir, records))} |" in updated
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# CIFAR-10 CNN classifier: report\n\nStudent: Jane Doe\nCourse: Deep Learning; Homework 2")
    for text in ["seed 2 epoch  1/1", "$ python CNNclassify.py train", "(a) the code: main (line ",
                 "(h) inference time: inference_speed_test (line ", "(b) training and testing output: train (line ",
                 "(d) ResNet-20's test accuracy: resnet20 (line ", "in its faster memory layout",
                 "ResNet-20 weights resnet20_cifar10_pretrained.pt (option B shortcuts, sha256 3eab1424e588)",
                 *build.class_table(results["runs"][0]), build.conv1_words(model_dir)]:
        assert text in markdown
    assert "Harry Potter" not in markdown and "beats" not in markdown
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert set(images) == {"accuracy.png", "CONV_rslt.png", C.CONFUSION_FILE}
    test_record = json.loads((records / "test.json").read_text())
    assert (out / "CONV_rslt.png").read_bytes() == (records / test_record["figure_copy"]).read_bytes()
    assert all((out / i).is_file() for i in images)
    assert markdown.index("## (h)") < markdown.index("## (a)")  # the code comes last
    headings = re.findall(r"^## \((\w)\)", markdown, flags=re.M)
    assert set(headings) == set("abcdefgh")
    assert (ROOT / "CNNclassify.py").read_text() in markdown  # (a) is the code as it is
    pdf = (out / "report.pdf").read_bytes()
    assert pdf[:5] == b"%PDF-" and build.read_stamp(out / "report.pdf") == {
        "code_sha256": C.sha256_of(ROOT / "CNNclassify.py"), "author": "Jane Doe"}
    assert report(model_dir, records, tmp_path / "again", "--author", "Jane Doe", "--course",
                  "Deep Learning").returncode == 0
    assert (tmp_path / "again" / "report.pdf").read_bytes() == pdf  # same records, same bytes


def blocks(markdown):
    """The terminal blocks of report.md: [(command, the lines under it)]."""
    found = re.findall(r"^```\n\$ (.*?)\n(.*?)^```$", markdown, flags=re.M | re.S)
    return [(command, body.splitlines()) for command, body in found]


def test_every_block_is_what_its_command_printed(made):
    """Each block of the report is, byte for byte, the stdout of the command above it ((b) the
    whole of `train`'s, (g) its closing table)."""
    folder, printed = made
    shown = blocks((folder / "report" / "report.md").read_text())
    assert sorted(command.split()[2] for command, _ in shown) == sorted([*printed, "train"])
    for command, lines in shown:
        stdout = printed[command.split()[2]].splitlines()
        assert lines == stdout or (command.split()[2] == "train" and lines == stdout[-5:]), command
    assert (folder / "model" / "train_log.txt").read_text() == printed["train"]


def test_a_report_with_an_item_missing_is_refused_and_names_the_commands(made, tmp_path):
    model_dir, records = copy_made(made, tmp_path)
    (records / "speed.json").unlink()
    result = report(model_dir, records, tmp_path / "report")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "run `python CNNclassify.py speed`" in result.stderr
    assert not (tmp_path / "report").exists()
    (tmp_path / "empty").mkdir()
    result = report(tmp_path / "empty", tmp_path / "empty", tmp_path / "report")
    assert result.returncode == 2 and "run `python CNNclassify.py train`" in result.stderr
    assert not (tmp_path / "report").exists()


def test_records_of_another_model_or_other_weights_are_refused(made, tmp_path):
    """A student who retrains and forgets a command: the report names the command to rerun."""
    model_dir, records = copy_made(made, tmp_path)
    original = (model_dir / "cnn.pt").read_bytes()
    other = C.build_cnn()
    C.save_checkpoint(model_dir / "cnn.pt", other, {"seed": 1})
    result = report(model_dir, records, tmp_path / "report")
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "made from another model" in result.stderr and "rerun `python CNNclassify.py train`" in result.stderr
    (model_dir / "cnn.pt").write_bytes(original)
    speed = json.loads((records / "speed.json").read_text())
    (records / "speed.json").write_text(json.dumps(dict(speed, weights_sha256="cd" * 32)))
    result = report(model_dir, records, tmp_path / "report")
    assert result.returncode == 2 and "speed: measured other ResNet-20 weights" in result.stderr
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("damage", ["{not json", '{"runs": "three", "machine": {}}', "[1, 2]"])
def test_bad_results_file_is_one_line_and_changes_nothing(made, tmp_path, damage):
    model_dir, records = copy_made(made, tmp_path)
    out = tmp_path / "made" / "report"  # the report built from the good records
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\nkept\n<!-- results:end -->\n<!-- machines:start -->\n<!-- machines:end -->\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (model_dir / "results.json").write_text(damage)
    result = report(model_dir, records, out, "--readme", readme)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and ("results.json" in result.stderr or "malformed" in result.stderr)
    assert readme.read_text().startswith("<!-- results:start -->\nkept\n<!-- results:end -->\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_readme_without_markers_is_refused_before_anything_is_written(made, tmp_path):
    model_dir, records = made[0] / "model", made[0] / "model" / "records"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\nkept\n<!-- results:end -->\n")  # no machine table markers
    result = report(model_dir, records, tmp_path / "report", "--readme", readme)
    assert result.returncode == 2 and "machines:start" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "report").exists() and "kept" in readme.read_text()


def test_a_bug_in_a_builder_is_a_traceback_not_a_malformed_record(made, tmp_path, monkeypatch):
    """Only reading and checking a record is turned into a one-line error; a builder's own bug
    must surface as itself."""
    model_dir, records = made[0] / "model", made[0] / "model" / "records"
    monkeypatch.setattr(build, "summary_rows", lambda records, source: {}["no such key"])
    with pytest.raises(KeyError):
        build.report(model_dir, records, tmp_path / "report", "Jane Doe")


def test_shipped_report_is_of_the_shipped_model_and_names_no_machine_path():
    """The committed report and records agree with model/cnn.pt; no file under model/ or in the
    report names an absolute path or a home folder."""
    records = build.read_records(C.MODEL_DIR, C.RECORDS_DIR)  # refuses stale records
    assert records["results"]["main_model_sha256"] == C.sha256_of(C.MODEL_DIR / "cnn.pt")
    texts = [p.read_text() for p in (ROOT / "model").rglob("*") if p.suffix in (".json", ".txt")]
    texts.append((ROOT / "report" / "report.md").read_text())
    assert not [t for t in texts if re.search(r'["( ](/root|/home|/Users|/work|/tmp)/', t)]
    results = records["results"]
    for run in results["runs"]:  # (b) is the whole run: every epoch of every seed
        assert all(C.epoch_line(run["seed"], row, results["epochs"]) in texts[-1] for row in run["history"])
    commands = re.findall(r"python CNNclassify\.py [^`\n]*", texts[-1])  # as shown, and run by a TA
    assert commands and not [c for c in commands if re.search(r"\.\./|\s/|--data-dir|--weights", c)]
    assert "Harry Potter" not in texts[-1] and "Homework 2" in texts[-1]


def test_shipped_report_prints_the_committed_code():
    """report.pdf embeds CNNclassify.py (item a): it must be the code as committed."""
    digest = hashlib.sha256((ROOT / "CNNclassify.py").read_bytes()).hexdigest()
    assert build.read_stamp(ROOT / "report" / "report.pdf")["code_sha256"] == digest, \
        "report/report.pdf is stale: rerun `python report/build.py report --author \"First Last\" --readme README.md`"
    assert (ROOT / "CNNclassify.py").read_text() in (ROOT / "report" / "report.md").read_text()


def test_terminal_and_code_lines_fit_the_page():
    from reportlab.pdfbase.pdfmetrics import stringWidth
    build.fonts()
    styles = build.styles()
    width = 595.27 - 2 * build.PAGE_MARGIN
    for style, room in [(styles["terminal"], width - 12), (styles["code"], width)]:
        columns = build.mono_columns(style, room)
        pieces = build.wrap("x" * 500 + "\ty", columns, 4)
        assert len(pieces) > 1 and max(stringWidth(p, style.fontName, style.fontSize) for p in pieces) <= room
    epoch = C.epoch_line(0, {"epoch": 15, "train_loss": 0.8123, "train_accuracy": 96.12, "test_loss": 0.6034,
                             "test_accuracy": 93.4, "seconds": 1537.0}, 15)
    assert len(epoch) <= build.mono_columns(styles["terminal"], width - 12)  # a training screenshot line is never cut
    landscape = 841.89 - 2 * build.PAGE_MARGIN  # the code pages: every line of the script is printed whole
    assert max(map(len, (ROOT / "CNNclassify.py").read_text().splitlines())) <= build.mono_columns(styles["code"], landscape) - 6


@pytest.mark.skipif(shutil.which("pdftotext") is None, reason="pdftotext (poppler-utils) not installed")
def test_shipped_report_is_legible_and_nothing_runs_off_the_page():
    """What a grader sees at 100%: type of 8 pt or more, no word at or past a page edge."""
    out = subprocess.run(["pdftotext", "-bbox", str(ROOT / "report" / "report.pdf"), "-"], capture_output=True, text=True).stdout
    heights, outside = [], []
    for width, body in re.findall(r'<page width="([\d.]+)" height="[\d.]+">(.*?)</page>', out, re.S):
        for x0, y0, x1, y1, word in re.findall(r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">(.*?)</word>', body):
            heights.append(float(y1) - float(y0))
            if float(x0) <= 0 or float(x1) >= float(width):
                outside.append(word)
    assert heights and statistics.median(heights) >= 8 - 1e-6 and min(heights) >= 8 - 1e-6 and outside == []


# ----------------------------------------------------------------------------- submit

@pytest.fixture(scope="module")
def hand_in_copy(tmp_path_factory):
    """A copy of the project as a student has it, with its report built for Harry Potter."""
    root = tmp_path_factory.mktemp("project")
    for name in ["CNNclassify.py", "requirements.txt", "README.md"]:
        shutil.copy(ROOT / name, root / name)
    (root / "report").mkdir()
    shutil.copy(ROOT / "report" / "build.py", root / "report" / "build.py")
    shutil.copytree(ROOT / "test_images", root / "test_images")
    if not (ROOT / "model" / "cnn.pt").exists():
        pytest.skip("no trained model committed in model/")
    shutil.copytree(ROOT / "model", root / "model", ignore=shutil.ignore_patterns("subset"))
    (root / "model" / "subset").mkdir()
    (root / "model" / "subset" / "cnn.pt").write_bytes(b"a quick check, never handed in")
    done = run_build("report", "--author", "Harry Potter", cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def submit(root, *args):
    return run_build("submit", *args, cwd=root)


def test_submit_builds_and_proves_the_zip(hand_in_copy, tmp_path):
    result = submit(hand_in_copy, "Potter", "Harry", "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "Potter_Harry_HW2.zip"
    names = zipfile.ZipFile(path).namelist()
    assert {"CNNclassify.py", "model/cnn.pt", "model/results.json", "model/accuracy.png", "report/report.pdf",
            "requirements.txt", "README.md", "model/resnet20_cifar10_pretrained.pt", "model/records/test.json"} <= set(names)
    assert {f"test_images/{p.name}" for p in (hand_in_copy / "test_images").iterdir()} <= set(names)
    assert not [n for n in names if "subset" in n or re.search(r"data_batch|test_batch|batches\.meta|\.tar\.gz", n)]
    assert path.stat().st_size < 50_000_000
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"{path}: {len(names)} files") and any(line.endswith("  model/cnn.pt") for line in lines)
    assert lines[-1].startswith("checked: unpacked into a temporary folder") and "prediction result: " in lines[-1]


def readme_commands():
    """The commands README shows: its indented code lines that start with `python `."""
    return [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("    python ")]


def test_readme_commands_run_as_written_and_print_the_reports_blocks(hand_in_copy, tmp_path, cifar):
    """A student's copy of the project with CIFAR-10 in ./data: every command README shows runs
    as written (`train`, an hour per seed, is parsed only), and those whose output the shipped
    report shows print its block again: (b)'s test, (d), (f) to the byte, (h) in its shape."""
    project = tmp_path / "project"
    shutil.copytree(hand_in_copy, project, symlinks=True)
    (project / "data").symlink_to(CIFAR_DIR)
    commands = readme_commands()
    assert {c.split()[1] for c in commands} == {"CNNclassify.py", "report/build.py"} and len(commands) >= 7
    shown = dict(blocks((ROOT / "report" / "report.md").read_text()))
    for command in commands:
        argv = shlex.split(command, comments=True)
        if argv[1:3] == ["CNNclassify.py", "train"]:
            assert C.build_parser().parse_args(argv[2:]).seeds == [0, 1, 2]
            continue
        done = subprocess.run([sys.executable, *argv[1:]], cwd=project, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and done.stderr == "", (command, done.stderr)
        name = argv[2] if argv[1] == "CNNclassify.py" else None
        if name in ("resnet20", "profile"):
            assert done.stdout.splitlines() == shown[f"python CNNclassify.py {name}"], command
        if name == "test":
            record = json.loads((ROOT / "model" / "records" / "test.json").read_text())
            assert done.stdout.splitlines() == shown[record["command"]][:1]
        if name == "speed":  # times, and so the faster layout, differ from run to run
            shape = lambda lines: [" ".join(re.sub(r"\d+\.\d+|channels_last|NCHW", "#", line).split()) for line in lines]
            assert shape(done.stdout.splitlines()) == shape(shown["python CNNclassify.py speed"])
    assert (project / "Last_First_HW2.zip").is_file()  # submit ran, and proved the zip


@pytest.mark.parametrize("args,problem", [(["Pott3r", "Harry"], "plain letters"), (["Potter", "Harry James"], "plain letters"),
                                          (["Granger", "Hermione"], "does not name Hermione Granger")])
def test_submit_refuses_bad_names(hand_in_copy, tmp_path, args, problem):
    result = submit(hand_in_copy, *args, "--out-dir", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and problem in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_submit_refuses_a_stale_report_or_no_model(hand_in_copy, tmp_path):
    script = hand_in_copy / "CNNclassify.py"
    original = script.read_bytes()
    script.write_bytes(original + b"\n# changed after the report was built\n")
    try:
        result = submit(hand_in_copy, "Potter", "Harry", "--out-dir", tmp_path)
    finally:
        script.write_bytes(original)
    assert result.returncode == 2 and "another CNNclassify.py" in result.stderr and list(tmp_path.iterdir()) == []
    model = hand_in_copy / "model" / "cnn.pt"
    model.rename(model.with_suffix(".kept"))
    try:
        result = submit(hand_in_copy, "Potter", "Harry", "--out-dir", tmp_path)
    finally:
        model.with_suffix(".kept").rename(model)
    assert result.returncode == 2 and "cnn.pt is missing" in result.stderr and list(tmp_path.iterdir()) == []


def test_zip_never_takes_dataset_files(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"pixels")
    with pytest.raises(C.UserError, match="CIFAR-10 data"):
        build.build_zip([("model/data_batch_1", tmp_path / "data_batch_1")])


def test_the_script_says_where_report_and_submit_are(cli):
    result = run_build("--help")
    assert result.returncode == 0 and "report" in result.stdout and "submit" in result.stdout
    assert "report/build.py" in cli("--help").stdout
    result = cli("report", "--author", "Harry Potter")  # not a command of the script
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.strip().splitlines()) == 1


def test_evidence_quotes_the_screen_and_the_confirmations_as_computed_from_their_files(tmp_path, monkeypatch):
    """The report's screen line is computed from bench/screen_rows.jsonl (paired gain on 3 seeds,
    pooled spread, within or beyond two standard errors) and each confirmation from its record."""
    (tmp_path / "bench" / "confirm" / "x").mkdir(parents=True)
    row = lambda name, seed, acc: json.dumps({"candidate": name, "seed": seed, "val_accuracy": acc,
                                              "cpu": "CPU (k)", "cpu_kind": "k", "precision": "p"})
    rows = [row("shipped", s, a) for s, a in ((0, 91.0), (1, 92.0), (2, 91.5))]
    rows += [row("x", s, a) for s, a in ((0, 91.2), (1, 92.2), (2, 91.7))]  # +0.20 each seed
    rows += [row("y", s, a) for s, a in ((0, 90.0), (1, 91.0))]  # two seeds: no gain quoted
    (tmp_path / "bench" / "screen_rows.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "bench" / "confirm" / "x" / C.RESULTS_FILE).write_text(json.dumps(
        {"runs": [{"seed": 0, "test_accuracy": 92.5}, {"seed": 1, "test_accuracy": 92.125}]}))
    monkeypatch.setattr(C, "ROOT", tmp_path)
    (label, screen), (_, confirmed) = build.screen_rows()
    assert label == "screen on 5,000 held-out training images"
    assert screen.startswith("2 variants of the efficient preset, 2 to 3 seeds each (CPU (k), p); "
                             "best gain over the preset on 3 seeds +0.20 points (x), one run's standard deviation "
                             "about 0.55, so within two standard errors (0.89)")  # sqrt(1.5 / 5): each own mean out
    assert confirmed == "92.50% test accuracy, seed 0, 92.12% test accuracy, seed 1 (bench/confirm/x/results.json)"
    (tmp_path / "bench" / "screen_rows.jsonl").unlink()
    assert build.screen_rows() == []  # a hand-in without bench/
