"""Every user entry point is one Hydra app: ``examples/audex_*.py`` calls ``audex.cli.<name>.main`` (also the
``audex-*`` console script), and ``--help`` lists the config groups it can be composed from."""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("audex_*.py"))


def test_examples_are_thin_wrappers_over_the_package_cli():
    setup = (ROOT / "setup.py").read_text()
    for path in EXAMPLES:
        tree = ast.parse(path.read_text())
        [imp] = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        name = path.stem.removeprefix("audex_")
        assert imp.module == f"audex.cli.{name}" and [a.name for a in imp.names] == ["main"], path
        script = "audex-" + name.replace("_", "-")
        assert f'"{script}=audex.cli.{name}:main"' in setup, f"setup.py has no console script {script} for {path.name}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_help_lists_the_config_groups(example, capsys, monkeypatch):
    """``--help`` of each entry point, run in this process (the same hydra_runner code path as the command line)."""
    main = importlib.import_module(f"audex.cli.{example.stem.removeprefix('audex_')}").main
    monkeypatch.setattr(sys, "argv", [example.name, "--help"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    groups = out.split("== Configuration groups ==", 1)
    assert len(groups) == 2, out[-2000:]
    listed = dict(re.findall(r"^(\w+): (.+)$", groups[1].split("== Config ==")[0], re.M))
    if example.stem == "audex_eval":
        assert "asr" in listed["suite"] and "tts" in listed["suite"]
    else:
        assert listed["model"].split(", ")[:2] == ["audex_2b", "audex_30b_a3b"] and "cpu" in listed["trainer"]
