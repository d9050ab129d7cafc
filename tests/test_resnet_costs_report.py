"""`resnet20`, `profile` and `speed`."""
import json
import os
import shutil
from argparse import Namespace

import pytest
import torch

import CNNclassify as C
from conftest import CIFAR_DIR, WEIGHTS_A, WEIGHTS_B, run_cli


@pytest.mark.parametrize("weights,expected,option", [(WEIGHTS_A, "91.73% (9173/10000)", "A"),
                                                     (WEIGHTS_B, "92.05% (9205/10000)", "B")])
def test_resnet20_reproduces_published_accuracy(tmp_path, cifar, weights, expected, option):
    result = run_cli("resnet20", "--weights", weights, "--data-dir", CIFAR_DIR, "--records-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ResNet-20 test accuracy: {expected}\n"
    record = json.loads((tmp_path / "resnet20.json").read_text())
    assert record["output"][0] == result.stdout.strip() and record["machine"]["cpu"]
    assert (record["weights"], record["option"]) == (weights.name, option)
    assert record["weights_sha256"] == C.sha256_of(weights)  # the whole hash in the record,
    assert f"sha256 {C.sha256_of(weights)[:12]}" in record["output"][1]  # its start where shown
    assert result.stderr == ""  # off a terminal: results on stdout, nothing else anywhere


def test_the_course_resnet20_in_model_is_the_default(tmp_path, cifar):
    """The hand-in's own copy of the course's weights, model/resnet20_cifar10_pretrained.pt,
    is what `resnet20`, `profile` and `speed` use with no --weights (the report's numbers)."""
    assert C.COURSE_RESNET20.read_bytes() == WEIGHTS_B.read_bytes()
    assert C.build_parser().parse_args(["resnet20"]).weights == str(C.COURSE_RESNET20)
    result = run_cli("resnet20", "--data-dir", CIFAR_DIR, "--records-dir", tmp_path)
    assert result.returncode == 0 and result.stdout == "ResNet-20 test accuracy: 92.05% (9205/10000)\n"


def test_resnet20_url_uses_the_torch_hub_cache_and_refuses_a_changed_file(tmp_path, cifar):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(WEIGHTS_A, checkpoints / "resnet20-12fca82f.th")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    result = run_cli("resnet20", "--weights", C.RESNET20_URL, "--data-dir", CIFAR_DIR, "--records-dir", tmp_path,
                     env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ResNet-20 test accuracy: 91.73% (9173/10000)\n"
    record = json.loads((tmp_path / "resnet20.json").read_text())
    assert record["weights"] == "resnet20-12fca82f.th" and record["weights_sha256"].startswith("12fca82f")
    (tmp_path / "resnet20.json").unlink()
    shutil.copy(WEIGHTS_B, checkpoints / "resnet20-12fca82f.th")  # other weights under the published name
    result = run_cli("resnet20", "--weights", C.RESNET20_URL, "--data-dir", CIFAR_DIR, "--records-dir", tmp_path,
                     env=env)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "resnet20-12fca82f.th: its sha256 does not start with 12fca82f" in line and "delete it" in line
    assert not (tmp_path / "resnet20.json").exists()  # refused before anything was computed or recorded


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
    resnet, named = C.load_resnet20(str(weights))
    assert named == {"weights": weights.name, "weights_sha256": C.sha256_of(weights), "option": resnet.option}
    for views in (6, 1):  # the accurate preset's views, the efficient one's
        cnn = C.ViewAverage(C.build_cnn(), views).eval()  # what load_cnn gives
        before = {k: v.clone() for k, v in cnn.state_dict().items()}
        rows, lines = C.cost_table(cnn, resnet)
        counted = {name: (macs, p) for name, macs, p in rows}
        assert counted["ResNet-20"][1] == params == sum(p.numel() for p in resnet.parameters())
        assert 40e6 < counted["ResNet-20"][0] < 42e6  # the published ~41M MACs
        one_view = counted["CNN (ours), one view"]
        assert one_view[1] == sum(p.numel() for p in cnn.parameters())
        shipped = rows[0]  # ours as shipped comes first: every test-time view counted
        assert shipped[1] == views * one_view[0] and shipped[2] == one_view[1]
        assert len(rows) == (3 if views > 1 else 2) and len(lines) == len(rows) + 3
        assert lines[-1] == (f"ours / ResNet-20, as shipped: {shipped[1] / counted['ResNet-20'][0]:.2f}x the MACs, "
                             f"{shipped[2] / params:.2f}x the parameters")
        after = cnn.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert not any(hasattr(m, "total_ops") for m in list(cnn.modules()) + list(resnet.modules()))


def test_inference_speed_test_times_both_models(tmp_path, shipped_model, capsys):
    args = Namespace(device="cpu", precision="auto", warmup=2, iterations=5, model=str(C.MODEL_DIR / C.MAIN_MODEL),
                     weights=str(WEIGHTS_B))
    result = C.inference_speed_test(args)  # no records_dir: it only measures and prints
    names = ["CNN (ours)"] + ["CNN, one view"] * (shipped_model.views > 1) + ["ResNet-20"]
    assert [m["name"] for m in result["models"]] == names
    assert capsys.readouterr().out.splitlines() == result["lines"]  # it prints its own table
    assert result["lines"][-2].startswith(f"{names[-2]} / ResNet-20: ") and result["lines"][-2].endswith("x the time")
    assert result["precision"] == "float32"  # batch 1: float32 on every CPU measured
    for m in result["models"]:
        assert 0 < m["median_ms"] <= m["p95_ms"] and m["mean_ms"] > 0
    assert result["device"] == "cpu" and result["iterations"] == 5 and result["weights"] == WEIGHTS_B.name


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
    model, named = C.load_resnet20((served / "resnet20-12fca82f.th").as_uri())
    assert model.option == "A" and named["weights_sha256"] == C.sha256_of(WEIGHTS_A)
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "resnet20-12fca82f.th").read_bytes() == WEIGHTS_A.read_bytes()
    output = capsys.readouterr()
    assert output.out == "" and output.err == ""  # off a terminal: no progress bar, no note


@pytest.mark.parametrize("args,problem", [(["--iterations", "0"], "--iterations: must be 1 or more"),
                                          (["--warmup", "-1"], "--warmup: must be 0 or more"),
                                          (["--device", "mps"], "no such device")])
def test_bad_speed_options_are_one_line(args, problem, tmp_path):
    result = run_cli("speed", *args, "--records-dir", tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr
