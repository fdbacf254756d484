"""Config loading: defaults, validation errors that name the key, dotted overrides, save/reload."""

from pathlib import Path

import pytest

from utils.config import (
    Config,
    ConfigError,
    changes_refused_on_resume,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_reproduce_reference_recipe():
    cfg = load_config(None)
    assert cfg.train.batch_size == 32 and cfg.train.lr == 1e-3 and cfg.train.momentum == 0.9
    assert cfg.train.weight_decay == 5e-4 and cfg.train.epochs == 230 and cfg.train.milestones == [150, 190]
    assert len(cfg.data.classes) == 20 and cfg.model.scales == [0.2, 0.4, 0.6]


def test_run_name_defaults_to_file_stem(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n", name="my_run.yaml"))
    assert cfg.run.name == "my_run"
    assert cfg.train.epochs == 3


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epochz'"):
        load_config(write(tmp_path, "train:\n  epochz: 3\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer'"):
        load_config(write(tmp_path, "trainer:\n  epochs: 3\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  epochs: many\n", "train.epochs"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  epochs: 2.5\n", "train.epochs"),
        ("model:\n  pretrained: 1\n", "model.pretrained"),
        ("data:\n  classes: cat\n", "data.classes"),
        ("model:\n  scales: [0.2, big]\n", r"model.scales\[1\]"),
        ("loss:\n  classification: hinge\n", "loss.classification"),
        ("model:\n  image_size: 100\n", "model.image_size"),
        ("train:\n  batch_size: 0\n", "train.batch_size"),
        ("loss:\n  threshold: 0.5\n  ignore_threshold: 0.6\n", "loss.ignore_threshold"),
        ("eval:\n  box_voting_iou: 0\n", "eval.box_voting_iou"),
        ("eval:\n  box_voting_iou: 1.5\n", "eval.box_voting_iou"),
        ("loss:\n  matching: nearest\n", "loss.matching"),
        ("loss:\n  atss_candidates: 1\n", "loss.atss_candidates"),
        # each of these used to fail deep inside training or evaluation, or to run with a meaningless value
        ("train:\n  log_every_steps: 0\n", "'train.log_every_steps' must be at least 1, got 0"),
        ("eval:\n  top_k: 0\n", "'eval.top_k' must be at least 1"),
        ("data:\n  num_workers: -1\n", "'data.num_workers' must be at least 0"),
        ("train:\n  lr: .nan\n", "'train.lr' must be a finite number"),
        ("train:\n  momentum: -1\n", r"'train.momentum' must be in \[0.0, 1.0\), got -1"),
        ("train:\n  ema_decay: 1.0\n", r"'train.ema_decay' must be in \(0.0, 1.0\)"),
        ("train:\n  save_every_steps: -1\n", "'train.save_every_steps' must be at least 0"),
        ("train:\n  weight_decay: -1\n", "'train.weight_decay' must be at least 0"),
        ("train:\n  warmup_epochs: -1\n", "'train.warmup_epochs' must be at least 0"),
        ("train:\n  min_lr_ratio: 5\n", r"'train.min_lr_ratio' must be in \[0.0, 1.0\]"),
        ("eval:\n  min_score: 3\n", r"'eval.min_score' must be in \[0.0, 1.0\)"),
        ("eval:\n  max_overlap: -5\n", r"'eval.max_overlap' must be in \(0.0, 1.0\]"),
        ("data:\n  synthetic:\n    n_trainval: 0\n", "'data.synthetic.n_trainval' must be at least 1"),
        # model and loss values that failed only after the data was loaded, without the key, or trained badly
        ("model:\n  width_mult: .inf\n", "'model.width_mult' must be a finite number"),
        ("model:\n  variances: [.nan, 0.2]\n", r"'model.variances' must hold 2 finite numbers > 0"),
        ("model:\n  variances: [.inf, 0.2]\n", r"'model.variances' must hold 2 finite numbers > 0"),
        ("model:\n  scales: []\n", "'model.scales' must hold one or more finite numbers > 0"),
        ("model:\n  aspect_ratios: [0]\n", "'model.aspect_ratios' must hold one or more finite numbers > 0"),
        ("model:\n  scales: [0.5, 1.5]\n", "'model.scales' must be at most 1"),
        ("loss:\n  alpha: .nan\n", "'loss.alpha' must be a finite number >= 0"),
        ("loss:\n  focal_gamma: .inf\n", "'loss.focal_gamma' must be a finite number >= 0"),
        ("loss:\n  focal_alpha: 1.5\n", r"'loss.focal_alpha' must be in \[0, 1\]"),
        ("loss:\n  ignore_threshold: 0\n", r"'loss.ignore_threshold' must be in \(0, loss.threshold=0.5\]"),
        ("model:\n  image_size: 32\nloss:\n  matching: atss\n", r"'loss.atss_candidates' \(36\) exceeds the 9 priors"),
        # accepted before, and then trained wrongly or failed with a traceback
        ("train:\n  grad_clip_norm: -1\n", "'train.grad_clip_norm' must be null or a finite number > 0, got -1"),
        ("train:\n  grad_clip_norm: 0\n", "'train.grad_clip_norm' must be null or a finite number > 0, got 0"),
        ("train:\n  gamma: -1\n", "'train.gamma' must be a finite number > 0, got -1"),
        ("train:\n  gamma: .nan\n", "'train.gamma' must be a finite number > 0, got nan"),
        ("train:\n  milestones: [-5]\n", r"'train.milestones' must hold epochs >= 0, got \[-5\]"),
        ("train:\n  stop_at_map: 90\n", r"'train.stop_at_map' must be in \(0.0, 1.0\], got 90"),
        ("train:\n  warmup_epochs: .inf\n", "'train.warmup_epochs' must be a finite number, got inf"),
        ("augment:\n  expand_probability: 2\n", r"'augment.expand_probability' must be in \[0.0, 1.0\], got 2"),
        ("augment:\n  expand_max_ratio: 0.5\n", "'augment.expand_max_ratio' must be a finite number >= 1"),
        ("augment:\n  expand_max_ratio: .inf\n", "'augment.expand_max_ratio' must be a finite number >= 1"),
        ("data:\n  synthetic:\n    image_size: 16\n", "'data.synthetic.image_size' must be at least 32, got 16"),
        ("model:\n  width_mult: 0.25\n", "'model.pretrained': ImageNet weights only fit model.width_mult=1.0"),
        ("model:\n  pretrained: false\n  weights_path: vgg.pth\n  width_mult: 0.5\n",
         "'model.weights_path': ImageNet weights only fit model.width_mult=1.0, got width_mult=0.5"),
        ("train:\n  weight_decay: .inf\n", "'train.weight_decay' must be a finite number, got inf"),
        # numpy's seed sequences take non-negative seeds only, torch.manual_seed 64-bit ones
        ("run:\n  seed: -1\n", r"'run.seed' must be an integer in \[0, 2\*\*64 - 1\], got -1"),
        ("run:\n  seed: 18446744073709551616\n", r"'run.seed' must be an integer in \[0, 2\*\*64 - 1\], got 1844"),
        ("data:\n  split_seed: -3\n", "data.split_seed"),
        ("data:\n  synthetic:\n    seed: -1\n", "data.synthetic.seed"),
        # one split file and a random split of the other could put training images in the test set
        ("data:\n  format: folder\n  train_split_file: train.txt\n",
         "'data.train_split_file' is set but 'data.test_split_file' is not"),
        ("data:\n  format: folder\n  test_split_file: test.txt\n",
         "'data.test_split_file' is set but 'data.train_split_file' is not"),
    ],
)
def test_wrong_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, text))


def test_exponent_without_dot_is_a_number(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n"), ["train.weight_decay=5e-4"])
    assert cfg.train.lr == 1e-3 and cfg.train.weight_decay == 5e-4
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(write(tmp_path, "train:\n  lr: 1e-3x\n"))


def test_int_accepted_for_float_and_null_for_optional(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n  grad_clip_norm: null\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip_norm is None


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_dotted_overrides_apply_with_types(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    cfg = load_config(path, ["train.epochs=2", "data.root=/x", "train.lr=0.01", "model.scales=[0.1,0.3]",
                             "train.grad_clip_norm=null", "model.pretrained=false"])
    assert cfg.train.epochs == 2 and cfg.data.root == "/x" and cfg.train.lr == 0.01
    assert cfg.model.scales == [0.1, 0.3] and cfg.train.grad_clip_norm is None and cfg.model.pretrained is False


def test_override_errors_name_the_key(tmp_path):
    path = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(path, ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"train\.nope"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="must look like"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(path, ["train.epochs.x=1"])
    with pytest.raises(ConfigError, match="is not a section"):
        load_config(write(tmp_path, "train:\n  epochs: 3\n"), ["train.epochs.x=1"])
    # The message says whether the file or the command line holds the bad value.
    with pytest.raises(ConfigError, match=r"train\.epochs.* \(overrides of .*run\.yaml\)$"):
        load_config(path, ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"train\.epochs.* \(.*bad\.yaml\)$"):
        load_config(write(tmp_path, "train:\n  epochs: two\n", name="bad.yaml"), ["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"^override 'train\.epochs' must look like section\.key=value$"):
        load_config(path, ["train.epochs"])


def test_overrides_merge_into_sections_and_read_values_for_their_key(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 2\n  optimizer: adamw\n  lr: 0.0025\neval:\n")
    # A section given as a mapping changes its keys; the file's others stay (they were reset to defaults).
    cfg = load_config(path, ["train={epochs: 5}"])
    assert (cfg.train.epochs, cfg.train.optimizer, cfg.train.lr) == (5, "adamw", 0.0025)
    # A key of a section left empty in the file (its defaults) can be set.
    assert load_config(path, ["eval.top_k=5"]).eval.top_k == 5
    # A text key takes the text: run names such as a date, or "yes".
    assert load_config(path, ["run.name=20241127"]).run.name == "20241127"
    assert load_config(path, ["run.name=yes"]).run.name == "yes"
    assert load_config(path, ["data.root=1.5"]).data.root == "1.5"
    # YAML 1.1 would read these as 8, 16 and 1000.
    for raw in ("010", "0x10", "1_000"):
        with pytest.raises(ConfigError, match=rf"override 'train.epochs={raw}': write the integer in plain decimal"):
            load_config(path, [f"train.epochs={raw}"])
    assert load_config(path, ["run.seed=0", "train.epochs=10"]).train.epochs == 10  # plain decimal, 0 included


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 7\n"), ["data.root=/data"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert isinstance(config_from_dict(config_to_dict(cfg), ["train.epochs=9"]), Config)
    assert config_from_dict(config_to_dict(cfg), ["train.epochs=9"]).train.epochs == 9
    assert cfg.train.epochs == 7  # the source mapping is not modified by overrides


def test_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfetrain:\n")
    with pytest.raises(ConfigError, match=r"config file .*c\.yaml is not UTF-8 text"):
        load_config(path)


def test_resume_may_change_where_how_long_and_how_it_evaluates_nothing_else():
    narrow = ["model.pretrained=false"]  # ImageNet weights only fit width 1
    saved = load_config(None, narrow)
    allowed = load_config(None, [*narrow, "train.epochs=400", "data.root=/elsewhere", "eval.top_k=100",
                                 "train.device=cpu"])
    assert changes_refused_on_resume(saved, allowed) == []
    refused = load_config(None, [*narrow, "train.lr=0.01", "model.width_mult=0.5", "train.epochs=400"])
    assert changes_refused_on_resume(saved, refused) == ["model.width_mult: 1.0 -> 0.5", "train.lr: 0.001 -> 0.01"]


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    # YAML keeps the last silently: a second `train:` appended at the end dropped the whole first section.
    path = write(tmp_path, "train:\n  epochs: 2\n  lr: 0.1\nmodel:\n  width_mult: 1.0\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"key 'train' appears twice \(first on line 1\)(.|\n)*line 6"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'batch_size' appears twice \(first on line 2\)"):
        load_config(write(tmp_path, "train:\n  batch_size: 2\n  batch_size: 4\n"))


def test_keys_of_another_data_format_are_warned_about(tmp_path, monkeypatch):
    import utils.config as config_module

    warnings = []
    monkeypatch.setattr(config_module.logger, "warning", lambda message, *args: warnings.append(message % args))
    # a split file given with format voc (as when adapting voc.yaml) was ignored without a word
    load_config(write(tmp_path, "data:\n  format: voc\n  train_split_file: train.txt\n  test_split_file: t.txt\n"))
    assert warnings and "'data.train_split_file' is only read with data.format: folder" in warnings[0]
    warnings.clear()
    load_config(write(tmp_path, "data:\n  format: folder\n  train_sets: [[VOC2007, train]]\n"))
    assert any("'data.train_sets' is only read with data.format: voc" in w for w in warnings)
    warnings.clear()
    for name in ("demo", "voc", "custom"):
        load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert warnings == []
