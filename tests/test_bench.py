"""The bench scripts run against today's CNNclassify.py: every name they take from it exists."""
import ast
import re

import pytest

import CNNclassify as C
from conftest import ROOT

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
