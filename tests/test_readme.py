"""The README's commands as written: every `python X.py ...` and `python -m src.X ...` line of its
command blocks parses with X's own parser (options that exist, values of the right type and choice),
and every `bash scripts/...` line names a launcher that exists."""
import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def readme_commands():
    """(line number, module, arguments) of every python command in the README's bash/text blocks."""
    text = (ROOT / "README.md").read_text()
    commands = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        line = line.split("  #")[0].rstrip()
        if not pending:
            start = number
        pending += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        command, pending = pending.strip(), ""
        script = re.search(r"(?:^|\s)bash +(scripts/[\w.]+\.sh)\b", command)
        if script:
            commands.append((start, script.group(1), []))
            continue
        match = re.search(r"(?:^|\s|;|&&)(?:\.venv/bin/)?python3? +(-m +(src\.[\w.]+)|((?:src/)?\w+)\.py)\b(.*)$",
                          command)
        if not match or (match.group(3) or "").startswith("bench"):
            continue
        module = match.group(2) or match.group(3).replace("/", ".")
        rest = re.split(r"\s(?:\||&&|;|>)\s", match.group(4))[0]
        args = [a for a in shlex.split(rest) if a != "..."]
        commands.append((start, module, args))
    return commands


def parser_of(module_name, monkeypatch):
    """The ArgumentParser a door or tool builds in its main(), captured when it parses."""
    module = importlib.import_module(module_name)

    def capture(parser, args=None, namespace=None):
        raise _Captured(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as captured:
        module.main([])
    monkeypatch.undo()
    return captured.value.parser


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    modules = {module for _, module, _ in COMMANDS}
    assert {"train", "val", "export", "eval_onnx", "embed", "convert", "align", "src.rec2jpg_dataset",
            "scripts/run_distribute_train.sh"} <= modules, modules


@pytest.mark.parametrize("line, module, args", COMMANDS, ids=[f"README:{n}" for n, _, _ in COMMANDS])
def test_each_readme_command_parses(line, module, args, monkeypatch):
    if module.startswith("scripts/"):
        assert (ROOT / module).is_file(), f"README.md line {line}: {module} does not exist"
        return
    parser = parser_of(module, monkeypatch)
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"README.md line {line}: python {module} {' '.join(args)} does not parse (exit {exc.code})")
