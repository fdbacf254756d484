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


def test_bench_train_refuses_fewer_images_than_a_batch(capsys):
    # Its loader drops the incomplete batch: with no full one, the loop waited for a batch forever.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_train

    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--images", "3", "train.batch_size=4"])
    assert exit_info.value.code == 2
    assert "--images 3 is less than train.batch_size 4" in capsys.readouterr().err


def test_overrides_may_come_between_the_flags():
    args = train.parse_args(["--config", "c.yaml", "train.epochs=20", "--no-progress", "run.name=x"])
    assert args.no_progress and args.overrides == ["train.epochs=20", "run.name=x"]
    args = eval_script.parse_args(["--config", "c.yaml", "a.b=1", "--no-coco", "--checkpoint", "x.pt", "c.d=2"])
    assert args.no_coco and args.checkpoint == "x.pt" and args.overrides == ["a.b=1", "c.d=2"]
