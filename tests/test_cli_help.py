"""Every command-line flag of the three scripts is described in --help."""

import argparse

import pytest

import detect
import eval as eval_script
import train


@pytest.mark.parametrize("module", [train, eval_script, detect])
def test_every_flag_has_a_description(module, capsys):
    parser = module.build_parser()
    assert parser.description
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{module.__name__}: {action.option_strings or action.dest}"
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in printed
