"""`resnet20`, `profile`, `speed` and `report`."""
import hashlib
import json
import os
import re
import shutil
from argparse import Namespace

import pytest
import torch

import CNNclassify as C
from conftest import CIFAR_DIR, ROOT, WEIGHTS_A, WEIGHTS_B, run_cli


@pytest.mark.parametrize("weights,expected,option", [(WEIGHTS_A, "91.73% (9173/10000)", "A"),
                                                     (WEIGHTS_B, "92.05% (9205/10000)", "B")])
def test_resnet20_reproduces_published_accuracy(tmp_path, cifar, weights, expected, option):
    result = run_cli("resnet20", "--weights", weights, "--data-dir", CIFAR_DIR, "--records-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ResNet-20 test accuracy: {expected}\n"
    record = json.loads((tmp_path / f"resnet20_option{option}.json").read_text())
    assert record["output"] == [result.stdout.strip()] and record["machine"]["cpu"]


def test_resnet20_default_url_uses_the_torch_hub_cache(tmp_path, cifar):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(WEIGHTS_A, checkpoints / "resnet20-12fca82f.th")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    result = run_cli("resnet20", "--data-dir", CIFAR_DIR, "--records-dir", tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ResNet-20 test accuracy: 91.73% (9173/10000)\n"


def test_resnet20_without_weights_or_network_is_one_line(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    result = run_cli("resnet20", "--weights", (tmp_path / "nowhere" / "resnet20-12fca82f.th").as_uri(),
                     "--data-dir", tmp_path, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--weights" in result.stderr.strip().splitlines()[-1]


def test_resnet20_unknown_layout_is_an_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(C.UserError, match="unknown checkpoint layout"):
        C.load_resnet20(str(tmp_path / "odd.pt"))


@pytest.mark.parametrize("weights,params", [(WEIGHTS_A, 269_722), (WEIGHTS_B, 272_474)])
def test_profile_counts_resnet20_params_and_leaves_models_untouched(weights, params):
    resnet = C.load_resnet20(str(weights))
    cnn = C.build_cnn().eval()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    rows, lines = C.cost_table(cnn, resnet)
    counted = {name: (macs, p) for name, macs, p in rows}
    assert counted["ResNet-20"][1] == params == sum(p.numel() for p in resnet.parameters())
    assert 40e6 < counted["ResNet-20"][0] < 42e6  # the published ~41M MACs
    one_view, tta = counted["CNN (ours), one view"], counted["CNN (ours), with flip TTA"]
    assert tta[0] == 2 * one_view[0] and tta[1] == one_view[1] == sum(p.numel() for p in cnn.parameters())
    after = cnn.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(m, "total_ops") for m in list(cnn.modules()) + list(resnet.modules()))
    assert len(lines) == 5


def test_inference_speed_test_times_both_models(tmp_path, shipped_model):
    args = Namespace(device="cpu", precision="auto", warmup=2, iterations=5, model=str(C.MODEL_DIR / C.MAIN_MODEL), weights=str(WEIGHTS_B))
    result = C.inference_speed_test(args)
    assert [m["name"] for m in result["models"]] == ["CNN (ours)", "CNN, one view", "ResNet-20"]
    for m in result["models"]:
        assert 0 < m["median_ms"] <= m["p95_ms"] and m["mean_ms"] > 0
    assert result["device"] == "cpu" and result["iterations"] == 5


def write_fixture_records(folder):
    """Small but complete records in the formats the commands write."""
    machine = C.machine_description(torch.device("cpu"))
    model_dir, records = folder / "model", folder / "records"
    model_dir.mkdir()
    records.mkdir()
    history = [{"epoch": e, "train_loss": 1.0, "train_accuracy": 50.0 + e, "test_loss": 1.0,
                "test_accuracy": 60.0 + e, "seconds": 10.0 * e, "images_per_second": 100.0} for e in (1, 2)]
    runs = [{"seed": s, "test_accuracy": 62.0 + s, "train_seconds": 20.0, "images_per_second": 100.0,
             "seconds_per_epoch": 10.0, "history": history} for s in (0, 1, 2)]
    results = {"command": "python CNNclassify.py train --seeds 0 1 2", "machine": machine, "runs": runs,
               "mean": 63.0, "std": 0.816, "precision": "float32", "epochs": 2}
    (model_dir / "results.json").write_text(json.dumps(results))
    C.plot_accuracy(runs, model_dir / "accuracy.png")
    model = C.build_cnn()
    C.set_whitening(model, torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8), C.HYPERPARAMETERS["whitening"])
    C.save_checkpoint(model_dir / "cnn.pt", model, {})
    common = {"command": "python CNNclassify.py x", "machine": machine}
    (records / "resnet20_w.json").write_text(json.dumps({**common, "weights": "w.pt", "accuracy": 91.5, "output": ["ResNet-20 test accuracy: 91.50%"]}))
    (records / "profile.json").write_text(json.dumps({**common, "output": ["table"], "models": [{"name": "CNN", "macs": 5, "params": 6}]}))
    (records / "speed.json").write_text(json.dumps({**common, "output": ["speed table"], "models": [{"name": "CNN", "mean_ms": 1.5}]}))
    return model_dir, records


def test_report_builds_markdown_and_pdf_from_records(tmp_path):
    model_dir, records = write_fixture_records(tmp_path)
    out = tmp_path / "report"
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold table\n<!-- results:end -->\noutro\n"
                      "<!-- outputs:start -->\nold output\n<!-- outputs:end -->\n")
    result = run_cli("report", "--model-dir", model_dir, "--records-dir", records, "--out-dir", out, "--readme", readme)
    assert result.returncode == 0, result.stderr
    updated = readme.read_text()
    assert updated.startswith("intro\n<!-- results:start -->\n| item | result |")
    assert updated.endswith("<!-- outputs:end -->\n") and "<!-- results:end -->\noutro\n" in updated
    assert "old table" not in updated and "| ResNet-20 (w.pt) | 91.50% |" in updated
    assert "old output" not in updated and "speed table" in updated and "prediction result: " in updated
    markdown = (out / "report.md").read_text()
    for text in ["63.00% +/- 0.82", "ResNet-20 test accuracy: 91.50%", "speed table", "prediction result: ",
                 "seed 2 epoch  2/2", "python CNNclassify.py train --seeds 0 1 2"]:
        assert text in markdown
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert set(images) == {"accuracy.png", "CONV_rslt.png"} and all((out / i).is_file() for i in images)
    assert (out / "report.pdf").read_bytes()[:5] == b"%PDF-"
    assert "\n## Missing records\n" not in markdown and result.stderr == ""
    assert "| CNN first epoch end at >= 75% test accuracy | not reached by every seed |" in updated
    headings = re.findall(r"^## \((\w)\)", markdown, flags=re.M)
    assert headings == sorted(headings) and set(headings) == set("abcdefgh")  # the assignment's order
    assert (ROOT / "CNNclassify.py").read_text() in markdown  # (a) is the code as it is
    assert hashlib.sha256((ROOT / "CNNclassify.py").read_bytes()).hexdigest().encode() in (out / "report.pdf").read_bytes()


def test_seconds_to_reach_is_the_first_epoch_end_at_the_accuracy():
    history = [{"test_accuracy": a, "seconds": s} for a, s in [(70.0, 60.0), (75.0, 120.0), (74.0, 180.0)]]
    assert C.seconds_to_reach(history, 75.0) == 120.0
    assert C.seconds_to_reach(history, 70.0) == 60.0 and C.seconds_to_reach(history, 76.0) is None


def test_report_names_the_command_for_a_missing_record(tmp_path):
    model_dir, records = write_fixture_records(tmp_path)
    (records / "speed.json").unlink()
    out = tmp_path / "report"
    result = run_cli("report", "--model-dir", model_dir, "--records-dir", records, "--out-dir", out)
    assert result.returncode == 0
    assert "run `python CNNclassify.py speed` to make it" in result.stderr
    assert "python CNNclassify.py speed" in (out / "report.md").read_text() and (out / "report.pdf").exists()


def test_shipped_report_prints_the_committed_code():
    """report.pdf embeds CNNclassify.py (item a): it must be the code as committed."""
    pdf = (ROOT / "report" / "report.pdf").read_bytes()
    digest = hashlib.sha256((ROOT / "CNNclassify.py").read_bytes()).hexdigest()
    assert digest.encode() in pdf, "report/report.pdf is stale: rerun `python CNNclassify.py report --readme README.md`"
    assert (ROOT / "CNNclassify.py").read_text() in (ROOT / "report" / "report.md").read_text()


@pytest.mark.parametrize("damage", ["{not json", '{"runs": "three", "machine": {}}', "[1, 2]"])
def test_bad_results_file_is_one_line_and_changes_nothing(tmp_path, damage):
    model_dir, records = write_fixture_records(tmp_path)
    out = tmp_path / "report"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\nkept\n<!-- results:end -->\n")
    assert run_cli("report", "--model-dir", model_dir, "--records-dir", records, "--out-dir", out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (model_dir / "results.json").write_text(damage)
    result = run_cli("report", "--model-dir", model_dir, "--records-dir", records, "--out-dir", out, "--readme", readme)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "results.json" in result.stderr or "malformed" in result.stderr
    assert readme.read_text() == "<!-- results:start -->\nkept\n<!-- results:end -->\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tampered_cached_checkpoint_is_refused(tmp_path):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {}}, checkpoints / "resnet20-12fca82f.th")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    result = run_cli("resnet20", "--data-dir", CIFAR_DIR, "--records-dir", tmp_path, env=env)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: checksum mismatch") and len(result.stderr.strip().splitlines()) == 1


def test_download_with_the_wrong_hash_is_a_checksum_mismatch_and_saves_nothing(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "resnet20-12fca82f.th").write_bytes(b"not the published weights")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    result = run_cli("resnet20", "--weights", (served / "resnet20-12fca82f.th").as_uri(), "--data-dir", CIFAR_DIR,
                     "--records-dir", tmp_path, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("error: checksum mismatch")
    assert not list((tmp_path / "torch").rglob("*.th"))


def test_download_path_fills_the_cache_and_keeps_stdout_for_results(tmp_path, monkeypatch, capsys):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(WEIGHTS_A, served / "resnet20-12fca82f.th")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoint = C.fetch_resnet20_checkpoint((served / "resnet20-12fca82f.th").as_uri())
    assert checkpoint["state_dict"].keys() == torch.load(WEIGHTS_A, map_location="cpu", weights_only=True)["state_dict"].keys()
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "resnet20-12fca82f.th").read_bytes() == WEIGHTS_A.read_bytes()
    output = capsys.readouterr()
    assert output.out == "" and "downloading" in output.err


@pytest.mark.parametrize("args,problem", [(["--iterations", "0"], "--iterations: must be 1 or more"),
                                          (["--warmup", "-1"], "--warmup: must be 0 or more"),
                                          (["--device", "mps"], "no such device")])
def test_bad_speed_options_are_one_line(args, problem, tmp_path):
    result = run_cli("speed", *args, "--records-dir", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr
