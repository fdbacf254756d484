"""configs/custom.yaml, the example for a user's own labelImg data, trains on real photographs."""

import json
from pathlib import Path

import pytest

import train as train_module
from tests.train_helpers import REPO
from utils.config import load_config


def test_custom_config_trains_a_few_steps_on_raccoon_photographs(tmp_path):
    cfg = load_config(
        REPO / "configs" / "custom.yaml",
        [
            f"data.root={REPO / 'tests' / 'fixtures' / 'raccoon'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.output_dir={tmp_path / 'runs'}",
            "data.num_workers=0",
            "train.epochs=1",
            "train.log_every_steps=1",
        ],
    )
    assert cfg.data.format == "folder" and cfg.data.classes == ["raccoon"]
    assert cfg.run.name == "custom"  # the file's stem: a copy named my_data.yaml writes checkpoints/my_data/
    summary = train_module.train(cfg, show_progress=False)
    assert summary["global_step"] == 3  # 6 training photos (splits/train.txt), batch 2
    assert summary["best_voc07_map"] is not None
    run = tmp_path / "runs" / "custom"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s["type"] == "train"] == [1, 2, 3]
    assert all(s["loss"] > 0 for s in steps if s["type"] == "train")
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file()


def test_a_missing_split_file_says_how_to_split_at_random(tmp_path):
    # custom.yaml names splits/*.txt: a data folder without them met only "file not found".
    import shutil

    from utils.builders import load_split_records
    from utils.config import ConfigError, load_config

    root = tmp_path / "mydata"
    shutil.copytree(Path(__file__).parent / "fixtures" / "raccoon" / "images", root / "images")
    shutil.copytree(Path(__file__).parent / "fixtures" / "raccoon" / "annotations", root / "annotations")
    cfg = load_config(Path(__file__).parents[1] / "configs" / "custom.yaml",
                      [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=r"data.train_split_file'.*set data.train_split_file and "
                                          r"data.test_split_file to null for a random split"):
        load_split_records(cfg.data, "train")
    cfg = load_config(Path(__file__).parents[1] / "configs" / "custom.yaml",
                      [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.train_split_file=null",
                       "data.test_split_file=null"])
    assert len(load_split_records(cfg.data, "train")) + len(load_split_records(cfg.data, "test")) == len(
        list((root / "annotations").glob("*.xml")))
