"""`report` (report/build.py) and `submit`: the hand-in a grader gets."""
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import CNNclassify as C
from conftest import CIFAR_DIR, ROOT

sys.path.insert(0, str(ROOT / "report"))
import build  # noqa: E402


def run_build(*args, cwd=ROOT):
    """report/build.py as a user runs it: a fresh process, its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "report/build.py", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def write_fixture_records(folder):
    """Small but complete records in the formats the commands write, of one small model."""
    machine = C.machine_description(torch.device("cpu"), torch.float32)
    model_dir, records = folder / "model", folder / "model" / "records"
    records.mkdir(parents=True)
    model = C.build_cnn()
    C.set_whitening(model, torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8))
    C.save_checkpoint(model_dir / "cnn.pt", model, {})
    sha = C.sha256_of(model_dir / "cnn.pt")
    history = [{"epoch": e, "train_loss": 1.0, "train_accuracy": 50.0 + e, "test_loss": 1.0,
                "test_accuracy": 60.0 + e, "seconds": 10.0 * e, "images_per_second": 100.0} for e in (1, 2)]
    confusion = (np.eye(10, dtype=int) * 60 + 4).tolist()  # 64 of 100 right per class, 4 taken for each other
    runs = [{"seed": s, "model": f"cnn_seed{s}.pt", "test_accuracy": 62.0 + s, "train_seconds": 20.0, "images_per_second": 100.0,
             "seconds_per_epoch": 10.0, "history": history, **C.class_results({"confusion_matrix": confusion})}
            for s in (0, 1, 2)]
    results = {"command": "python CNNclassify.py train", "machine": machine, "runs": runs, "mean": 63.0,
               "std": 0.816, "precision": "float32", "epochs": 2, "preset": "efficient", "views": 1,
               "main_model_sha256": sha, "main_seed": 0}
    (model_dir / "results.json").write_text(json.dumps(results))
    log = [C.epoch_line(r["seed"], h, 2) for r in runs for h in history] + C.seed_table(results)
    (model_dir / "train_log.txt").write_text("\n".join(log) + "\n")
    C.plot_accuracy(runs, model_dir / "accuracy.png")
    C.plot_confusion(runs[0], model_dir / C.CONFUSION_FILE)
    common = {"command": "python CNNclassify.py x", "machine": machine, "model_sha256": sha,
              "weights": "w.pt", "weights_sha256": "ab" * 32}
    (records / "resnet20.json").write_text(json.dumps({**common, "accuracy": 91.5,
                                                      "output": ["ResNet-20 test accuracy: 91.50%"]}))
    (records / "profile.json").write_text(json.dumps({**common, "output": ["table"], "models": [
        {"name": "CNN (ours), one view", "macs": 5, "params": 6}, {"name": "ResNet-20", "macs": 7, "params": 8}]}))
    (records / "speed.json").write_text(json.dumps({**common, "output": ["speed table"], "precision": "float32",
                                                     "models": [{"name": "CNN (ours)", "mean_ms": 1.5},
                                                                {"name": "ResNet-20", "mean_ms": 3.0}]}))
    assert C.main(["test", "chelsea.png", "--model", str(model_dir / "cnn.pt"), "--out", str(folder / "CONV_rslt.png"),
                   "--records-dir", str(records)]) == 0  # the test record, as the command leaves it
    return model_dir, records


def report(model_dir, records, out, *more):
    author = () if "--author" in more else ("--author", "Jane Doe")
    return run_build("report", "--model-dir", model_dir, "--records-dir", records, "--out-dir", out, *author, *more)


def test_report_builds_markdown_and_pdf_from_records(tmp_path):
    model_dir, records = write_fixture_records(tmp_path)
    out = tmp_path / "report"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold table\n<!-- results:end -->\noutro\n"
                      "<!-- machines:start -->\nold machines\n<!-- machines:end -->\n")
    result = report(model_dir, records, out, "--author", "Jane Doe", "--course", "Deep Learning",
                    "--readme", readme)
    assert result.returncode == 0, result.stderr
    updated = readme.read_text()
    assert updated.startswith("intro\n<!-- results:start -->\n| item | result |")
    assert updated.endswith("<!-- machines:end -->\n") and "<!-- results:end -->\noutro\n" in updated
    assert "old table" not in updated and "| ResNet-20 (w.pt) | 91.50% |" in updated
    assert "old machines" not in updated and "| machine | command | s per seed (max) |" in updated
    assert ("| test chelsea.png (a photograph from scikit-image's sample data, not CIFAR-10) | "
            "prediction result: ") in updated
    assert "| ours against ResNet-20, accuracy | 63.00 +/- 0.82 vs 91.50; seeds 0, 1, 2 at or below ResNet-20 |" in updated
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# CIFAR-10 CNN classifier: report\n\nStudent: Jane Doe\nCourse: Deep Learning; Homework 1")
    for text in ["63.00% +/- 0.82", "ResNet-20 test accuracy: 91.50%", "speed table", "prediction result: ",
                 "seed 2 epoch  2/2", "$ python CNNclassify.py train", "$ python CNNclassify.py test chelsea.png",
                 "(a) the code: main (line ", "(h) inference time: inference_speed_test (line ",
                 "(b) training and testing output: train (line ", "(d) ResNet-20's test accuracy: resnet20 (line ",
                 "cat            64.0%    100  airplane (4)"]:
        assert text in markdown
    assert "Harry Potter" not in markdown and "beats" not in markdown
    assert (model_dir / "train_log.txt").read_text() in markdown  # (b) is the log as printed
    test_record = json.loads((records / "test.json").read_text())
    assert "\n".join(["$ " + test_record["command"], *test_record["output"]]) in markdown  # (b): the record, verbatim
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert set(images) == {"accuracy.png", "CONV_rslt.png", C.CONFUSION_FILE}
    assert (out / "CONV_rslt.png").read_bytes() == (records / test_record["figure_copy"]).read_bytes()
    assert all((out / i).is_file() for i in images)
    assert markdown.index("## (h)") < markdown.index("## (a)")  # the code comes last
    headings = re.findall(r"^## \((\w)\)", markdown, flags=re.M)
    assert set(headings) == set("abcdefgh")
    assert (ROOT / "CNNclassify.py").read_text() in markdown  # (a) is the code as it is
    pdf = (out / "report.pdf").read_bytes()
    assert pdf[:5] == b"%PDF-" and build.read_stamp(out / "report.pdf") == {
        "code_sha256": C.sha256_of(ROOT / "CNNclassify.py"), "author": "Jane Doe"}
    assert result.stderr == ""
    assert report(model_dir, records, tmp_path / "again", "--author", "Jane Doe", "--course",
                  "Deep Learning").returncode == 0
    assert (tmp_path / "again" / "report.pdf").read_bytes() == pdf  # same records, same bytes


def test_a_report_with_an_item_missing_is_refused_and_names_the_commands(tmp_path):
    model_dir, records = write_fixture_records(tmp_path)
    (records / "speed.json").unlink()
    result = report(model_dir, records, tmp_path / "report")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "run `python CNNclassify.py speed`" in result.stderr
    assert not (tmp_path / "report").exists()
    (tmp_path / "empty").mkdir()
    result = report(tmp_path / "empty", tmp_path / "empty", tmp_path / "report")
    assert result.returncode == 2 and "run `python CNNclassify.py train`" in result.stderr
    assert not (tmp_path / "report").exists()


def test_records_of_another_model_or_other_weights_are_refused(tmp_path):
    """A student who retrains and forgets a command: the report names the command to rerun."""
    model_dir, records = write_fixture_records(tmp_path)
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
def test_bad_results_file_is_one_line_and_changes_nothing(tmp_path, damage):
    model_dir, records = write_fixture_records(tmp_path)
    out = tmp_path / "report"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\nkept\n<!-- results:end -->\n<!-- machines:start -->\n<!-- machines:end -->\n")
    assert report(model_dir, records, out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (model_dir / "results.json").write_text(damage)
    result = report(model_dir, records, out, "--readme", readme)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and ("results.json" in result.stderr or "malformed" in result.stderr)
    assert readme.read_text().startswith("<!-- results:start -->\nkept\n<!-- results:end -->\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_readme_without_markers_is_refused_before_anything_is_written(tmp_path):
    model_dir, records = write_fixture_records(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\nkept\n<!-- results:end -->\n")  # no machine table markers
    result = report(model_dir, records, tmp_path / "report", "--readme", readme)
    assert result.returncode == 2 and "machines:start" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "report").exists() and "kept" in readme.read_text()


def test_a_bug_in_a_builder_is_a_traceback_not_a_malformed_record(tmp_path, monkeypatch):
    """Only reading and checking a record is turned into a one-line error; a builder's own bug
    must surface as itself."""
    model_dir, records = write_fixture_records(tmp_path)
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
    commands = re.findall(r"python CNNclassify\.py [^`\n]*", texts[-1])  # as shown, and run by a TA
    assert commands and not [c for c in commands if re.search(r"\.\./|\s/|--data-dir|--weights", c)]
    assert "Harry Potter" not in texts[-1] and "Homework 1" in texts[-1]


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


def test_the_unzipped_hand_in_reproduces_the_report(hand_in_copy, tmp_path, cifar):
    """A TA unzips the hand-in, puts CIFAR-10 in ./data and runs the plain command: the
    ResNet-20 accuracy the report's (d) shows, from the weights the zip carries."""
    assert submit(hand_in_copy, "Potter", "Harry", "--out-dir", tmp_path).returncode == 0
    unpacked = tmp_path / "unzipped"
    zipfile.ZipFile(tmp_path / "Potter_Harry_HW2.zip").extractall(unpacked)
    (unpacked / "data").symlink_to(CIFAR_DIR)
    shown = json.loads((hand_in_copy / "model" / "records" / "resnet20.json").read_text())["output"]
    done = subprocess.run([sys.executable, "CNNclassify.py", "resnet20"], cwd=unpacked, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.splitlines() == shown[:1]
    assert shown[0] in (hand_in_copy / "report" / "report.md").read_text()


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


def test_the_script_says_where_report_and_submit_are():
    result = run_build("--help")
    assert result.returncode == 0 and "report" in result.stdout and "submit" in result.stdout
    from conftest import run_cli
    assert "report/build.py" in run_cli("--help").stdout
    result = run_cli("report", "--author", "Harry Potter")  # not a command of the script
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
