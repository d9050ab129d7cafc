"""The bench scripts run against today's CNNclassify.py: every name they take from it exists."""
import ast
import importlib.util
import json
import re
import sys

import pytest

import CNNclassify as C
from conftest import ROOT, make_fake_cifar

SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_script_uses_only_names_the_script_defines(script):
    tree = ast.parse(script.read_text())
    aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name == "CNNclassify"}
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in aliases}
    used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "CNNclassify" for alias in node.names}
    assert aliases or used, f"{script.name} does not use CNNclassify"
    assert sorted(name for name in used if not hasattr(C, name)) == []


def test_bench_shell_scripts_use_only_options_the_script_has():
    parser = C.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for script in sorted((ROOT / "bench").glob("*.sh")):
        for command, rest in re.findall(r"CNNclassify\.py (\w+)([^\n]*)", script.read_text()):
            assert command in commands, f"{script.name}: no command {command}"
            options = {o for a in commands[command]._actions for o in a.option_strings}
            assert set(re.findall(r"(--[a-z-]+)", rest)) <= options, f"{script.name}: {command}{rest}"


def test_screen_appends_a_row_per_run_and_a_rerun_skips_the_finished_ones(tmp_path, monkeypatch, capsys):
    """bench/screen.py survives any stop: each finished (candidate, seed) is a row at once, and a
    rerun trains only the rows not yet in the file; validation images are held out of training."""
    spec = importlib.util.spec_from_file_location("screen", ROOT / "bench" / "screen.py")
    screen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screen)
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    trained = []
    real = screen.train_candidate
    monkeypatch.setattr(screen, "train_candidate", lambda data, name, seed, *a: trained.append((name, seed)) or
                        real(data, name, seed, *a))
    rows = tmp_path / "rows.jsonl"

    def run(*seeds):
        argv = ["screen.py", "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--rows", str(rows),
                "--candidates", "shipped", "1x1_b3_24ep", "--seeds", *map(str, seeds)]
        monkeypatch.setattr(sys, "argv", argv)
        screen.main()
        return [json.loads(line) for line in rows.read_text().splitlines()]

    first = run(0)
    assert trained == [("shipped", 0), ("1x1_b3_24ep", 0)] and len(first) == 2
    assert first[0]["train_images"] + first[0]["val_images"] == 320 and first[1]["params"] < first[0]["params"]
    assert run(0) == first and len(trained) == 2  # nothing trained again
    assert [(r["candidate"], r["seed"]) for r in run(0, 1)[2:]] == [("shipped", 1), ("1x1_b3_24ep", 1)]
    assert trained[2:] == [("shipped", 1), ("1x1_b3_24ep", 1)]
    assert "| shipped | 0 |" in "\n".join(screen.table(first))


def test_screen_summary_compares_each_candidate_with_the_baseline_on_the_same_seeds():
    spec = importlib.util.spec_from_file_location("screen", ROOT / "bench" / "screen.py")
    screen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screen)
    row = lambda name, seed, acc, cpu: {"candidate": name, "seed": seed, "val_accuracy": acc,
                                        "cpu_seconds": cpu, "cpu_kind": "k", "precision": "p",
                                        "params": 10, "macs": 20}
    rows = [row("shipped", 0, 91.0, 100), row("shipped", 1, 92.0, 100), row("a", 0, 91.5, 150),
            row("b", 2, 93.0, 100)]
    lines = screen.summary(rows)
    assert lines[2].startswith("| shipped | k, p | 0 1 | 91.50% | +0.00 |")
    assert lines[3] == "| b | k, p | 2 | 93.00% | - | 10 | 20 | - |"  # no baseline on seed 2
    assert lines[4] == "| a | k, p | 0 | 91.50% | +0.50 | 10 | 20 | 1.50x |"
    assert "lie 1.00 to 1.00 points apart (1 candidates" in lines[-1]  # shipped's seeds only
    assert "about 0.71." in lines[-1]  # the sample standard deviation of 91 and 92
    three = screen.summary(rows + [row("a", 1, 92.5, 150), row("a", 2, 93.5, 150)])[-1]
    assert "lie 1.00 to 2.00 points apart (2 candidates" in three
    assert "about 0.91." in three  # sqrt((0.5 + 2) / (1 + 2)): each candidate around its own mean


def test_confirm_trains_plain_train_with_the_candidates_recipe(tmp_path, monkeypatch):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    spec = importlib.util.spec_from_file_location("confirm", ROOT / "bench" / "confirm.py")
    confirm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(confirm)
    monkeypatch.setitem(C.PRESETS, "efficient", C.PRESETS["efficient"])  # both restored afterwards
    monkeypatch.setattr(C, "invocation", C.invocation)
    monkeypatch.setattr(sys, "argv", ["confirm.py", "ema_0.99", "--data-dir", str(tmp_path / "data"),
                                      "--epochs", "1", "--seeds", "0", "--device", "cpu",
                                      "--model-dir", str(tmp_path / "out")])
    assert confirm.main() == 0
    results = json.loads((tmp_path / "out" / C.RESULTS_FILE).read_text())
    assert json.dumps(results).count('"average_decay": 0.99') >= 1
    assert '"average_decay": 0.98' not in json.dumps(results)
    assert results["command"].startswith("python bench/confirm.py ema_0.99 --data-dir")
