"""Command lines: `--help` answers without importing torch or transformers, and every option explains itself."""

import argparse
import subprocess
import sys
import textwrap

import pytest

import dsv4_cli


@pytest.mark.parametrize(
    "entry,argv",
    [
        ("main", []),
        ("main", ["demo"]),
        ("convert_main", []),
        ("convert_main", ["to-hf"]),
        ("convert_main", ["verify"]),
    ],
)
def test_help_does_not_import_torch(entry, argv):
    code = textwrap.dedent(
        f"""
        import sys, dsv4_cli
        try:
            dsv4_cli.{entry}({argv!r} + ["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        heavy = sorted(m for m in ("torch", "transformers", "modeling_deepseek_v4") if m in sys.modules)
        print("heavy:", heavy)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and result.stdout.strip().endswith("heavy: []")


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


@pytest.mark.parametrize("build", [dsv4_cli.dsv4_parser, dsv4_cli.convert_parser])
def test_every_option_has_help_text(build):
    for parser in all_parsers(build()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help text"


def test_bad_arguments_fail_fast_and_clearly(capsys):
    with pytest.raises(SystemExit) as exc:
        dsv4_cli.convert_main(["to-hf", "a", "b", "--shard-size", "lots"])
    assert exc.value.code == 2 and "is not a size" in capsys.readouterr().err
