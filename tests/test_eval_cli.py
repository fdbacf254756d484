"""eval.py and detect.py end to end on a tiny trained model."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect as detect_module
import eval as eval_module
import train as train_module
from tests.train_helpers import REPO, tiny_overrides
from utils.builders import detector_from_checkpoint
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import load_config

DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    overrides = tiny_overrides(root, name="tiny", epochs=2) + ["train.ema_decay=0.9"]
    summary = train_module.train(load_config(DEMO, overrides), show_progress=False)
    return {"root": root, "overrides": overrides, "summary": summary, "best": root / "runs" / "tiny" / "best.pt"}


def printed_map(text):
    return float(re.search(r"VOC07 mAP \(11-point\): ([0-9.]+)", text).group(1))


def test_eval_reproduces_training_map_and_writes_outputs(trained, capsys, tmp_path):
    out = tmp_path / "eval"
    code = eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir", str(out),
                             *trained["overrides"], "eval.coco_metrics=true"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    best = load_checkpoint(trained["best"])["best_map"]
    assert printed_map(printed) == pytest.approx(best, abs=5e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["voc07_map"] == pytest.approx(best, abs=1e-12)
    assert set(metrics["coco"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for name in ("ellipse", "rectangle", "triangle"):
        assert name in printed
        lines = (out / f"comp4_det_test_{name}.txt").read_text().splitlines()
        assert all(len(line.split()) == 6 for line in lines)
    assert (out / "pr_curves.png").stat().st_size > 1000


def test_results_dir_evaluation_equals_in_memory(trained, tmp_path, capsys):
    model_out, files_out = tmp_path / "model", tmp_path / "files"
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir",
                             str(model_out), "--no-coco", *trained["overrides"]]) == 0  # fmt: skip
    assert eval_module.main(["--config", DEMO, "--results-dir", str(model_out), "--output-dir", str(files_out),
                             "--no-coco", *trained["overrides"]]) == 0  # fmt: skip
    from_model = json.loads((model_out / "metrics.json").read_text())
    from_files = json.loads((files_out / "metrics.json").read_text())
    assert from_files["voc07_map"] == pytest.approx(from_model["voc07_map"], abs=1e-12)
    assert from_files["voc12_map"] == pytest.approx(from_model["voc12_map"], abs=1e-12)
    assert from_files["classes"] == from_model["classes"]


def test_model_settings_the_checkpoint_overrides_are_named(trained, tmp_path, capfd):
    out = tmp_path / "eval"
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir", str(out),
                             "--no-coco", *trained["overrides"]]) == 0  # fmt: skip
    err = capfd.readouterr().err
    assert "not used" not in err and "differ from the run's" not in err  # the training config: nothing to say
    baseline = json.loads((out / "metrics.json").read_text())["voc07_map"]
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir", str(out),
                             "--no-coco", *trained["overrides"], "model.image_size=96", "model.scales=[0.3,0.5]",
                             "loss.classification=focal_sigmoid"]) == 0  # fmt: skip
    err = capfd.readouterr().err
    assert ("these settings of --config and the overrides are not used: model.image_size=96 (checkpoint: 64), "
            "model.scales=[0.3, 0.5] (checkpoint: [0.2, 0.4, 0.6]), loss.classification='focal_sigmoid' "
            "(checkpoint: 'hard_negative')") in err
    assert json.loads((out / "metrics.json").read_text())["voc07_map"] == baseline


def test_evaluation_settings_unlike_the_runs_are_named(trained, tmp_path, capfd):
    out = tmp_path / "eval"
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir", str(out),
                             "--no-coco", *trained["overrides"], "eval.min_score=0.2", "train.amp=bf16"]) == 0
    err = capfd.readouterr().err
    assert ("these settings of --config and the overrides differ from the run's, so the mAP is not the one it "
            "logged: eval.min_score=0.2 (run: 0.01), train.amp='bf16' (run: 'fp32')") in err


def test_bad_inputs_give_clear_messages(trained, tmp_path, capfd):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00not a checkpoint")
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(broken), *trained["overrides"]]) == 2
    assert "cannot read checkpoint" in capfd.readouterr().err

    results = tmp_path / "results"
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir", str(results),
                             "--no-coco", *trained["overrides"]]) == 0  # fmt: skip
    capfd.readouterr()
    (results / "comp4_det_test_triangle.txt").write_text("000001 0.9 1 2 3\n")
    assert eval_module.main(["--config", DEMO, "--results-dir", str(results), *trained["overrides"]]) == 2
    err = capfd.readouterr().err
    assert "comp4_det_test_triangle.txt:1: expected 6 fields" in err

    checkpoint = load_checkpoint(trained["best"])
    with pytest.raises(CheckpointError, match="trained for 3 classes"):
        detector_from_checkpoint(checkpoint, trained["best"], ["cat", "dog"])


def test_detect_draws_boxes_and_writes_json(trained, tmp_path):
    images = sorted((trained["root"] / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[:2]
    folder = tmp_path / "inputs"
    folder.mkdir()
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "drawn"
    code = detect_module.main(["--checkpoint", str(trained["best"]), "--input", str(folder), "--output-dir", str(out),
                               "--min-score", "0.0", "--top-k", "5"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "detections.json").read_text())
    assert [entry["image"] for entry in report] == [str(folder / p.name) for p in images]
    for entry in report:
        assert 0 < len(entry["detections"]) <= 5
        for det in entry["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= entry["width"] and 0 <= y1 <= y2 <= entry["height"]
            assert det["class"] in ("ellipse", "rectangle", "triangle")
        drawn = cv2.imread(entry["output"])
        original = cv2.imread(entry["image"])
        assert drawn.shape == original.shape
        assert np.abs(drawn.astype(int) - original.astype(int)).max() > 100, "no box was drawn"


def test_detect_rejects_missing_input(trained, tmp_path, capfd):
    code = detect_module.main(["--checkpoint", str(trained["best"]), "--input", str(tmp_path / "nothing*.jpg")])
    assert code == 2
    assert "no image files found" in capfd.readouterr().err
    assert torch.__version__  # torch stays importable after the CLI's error path


def test_detect_names_a_truncated_photo(trained, tmp_path, capfd):
    photo = sorted((REPO / "tests" / "fixtures" / "raccoon" / "images").glob("*.jpg"))[0]
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photo.read_bytes()[:-200])
    code = detect_module.main(["--checkpoint", str(trained["best"]), "--input", str(truncated),
                               "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "cut.jpg: truncated JPEG" in capfd.readouterr().err


def test_detect_box_voting_moves_boxes_not_scores(trained, tmp_path, capfd):
    image = sorted((trained["root"] / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[0]
    reports = {}
    for voting in ("0", "0.3"):
        out = tmp_path / voting
        code = detect_module.main(["--checkpoint", str(trained["best"]), "--input", str(image), "--output-dir",
                                   str(out), "--min-score", "0.0", "--top-k", "5", "--box-voting-iou", voting])
        assert code == 0
        reports[voting] = json.loads((out / "detections.json").read_text())[0]["detections"]
    plain, voted = reports["0"], reports["0.3"]
    assert [d["score"] for d in voted] == [d["score"] for d in plain]
    assert [d["class"] for d in voted] == [d["class"] for d in plain]
    assert any(v["box"] != p["box"] for v, p in zip(voted, plain, strict=True))


def test_bad_device_is_named_by_its_source(trained, monkeypatch, capfd):
    best = str(trained["best"])
    assert eval_module.main(["--config", DEMO, "--checkpoint", best, "--device", "gpu", *trained["overrides"]]) == 2
    assert "--device is 'gpu'" in capfd.readouterr().err
    assert eval_module.main(["--config", DEMO, "--checkpoint", best, *trained["overrides"], "train.device=gpu"]) == 2
    assert "config key 'train.device' is 'gpu'" in capfd.readouterr().err
    image = sorted((trained["root"] / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[0]
    assert detect_module.main(["--checkpoint", best, "--input", str(image), "--device", "gpu"]) == 2
    assert "--device is 'gpu'" in capfd.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_module.main(["--checkpoint", best, "--input", str(image), "--device", "cuda"]) == 2
    err = capfd.readouterr().err
    assert "--device is 'cuda' but CUDA is not available" in err
    assert "train.device" not in err


def test_output_dir_that_cannot_be_a_folder_is_named(trained, tmp_path, capfd):
    a_file = tmp_path / "afile"
    a_file.write_text("keep me")
    image = sorted((trained["root"] / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[0]
    for out, reason in ((a_file, "is an existing file"), (a_file / "sub", "cannot create the folder")):
        code = eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir", str(out),
                                 "--no-coco", *trained["overrides"]])  # fmt: skip
        assert code == 2
        err = capfd.readouterr().err
        assert f"--output-dir {str(out)!r}" in err and reason in err
        code = detect_module.main(["--checkpoint", str(trained["best"]), "--input", str(image), "--output-dir",
                                   str(out)])  # fmt: skip
        assert code == 2
        err = capfd.readouterr().err
        assert f"--output-dir {str(out)!r}" in err and reason in err
    assert a_file.read_text() == "keep me"


def test_detect_keeps_same_named_images_apart(trained, tmp_path):
    images = sorted((trained["root"] / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[:2]
    for folder, image in zip("ab", images, strict=True):
        (tmp_path / "in" / folder).mkdir(parents=True)
        (tmp_path / "in" / folder / "x.jpg").write_bytes(image.read_bytes())
    out = tmp_path / "out"
    code = detect_module.main(["--checkpoint", str(trained["best"]), "--input", str(tmp_path / "in" / "*" / "x.jpg"),
                               "--output-dir", str(out), "--min-score", "0.0", "--top-k", "5"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "detections.json").read_text())
    assert [entry["output"] for entry in report] == [str(out / "a" / "x_detections.jpg"),
                                                     str(out / "b" / "x_detections.jpg")]  # fmt: skip
    drawn = [cv2.imread(entry["output"]).astype(int) for entry in report]
    originals = [cv2.imread(str(image)).astype(int) for image in images]
    # Each drawing is of its own image: closer to it than to the other input.
    for mine, other, picture in zip(originals, originals[::-1], drawn, strict=True):
        assert np.abs(picture - mine).mean() < np.abs(picture - other).mean()


def test_a_checkpoint_without_classes_or_config_is_named(trained, tmp_path, capfd):
    checkpoint = load_checkpoint(trained["best"])
    bare = tmp_path / "bare.pt"
    torch.save({"model": checkpoint["model"], "config": checkpoint["config"]}, bare)
    capfd.readouterr()
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(bare), "--output-dir", str(tmp_path / "e"),
                             *trained["overrides"]]) == 2  # fmt: skip
    image = tmp_path / "photo.jpg"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    assert detect_module.main(["--checkpoint", str(bare), "--input", str(image),
                               "--output-dir", str(tmp_path / "d")]) == 2  # fmt: skip
    err = capfd.readouterr().err
    assert err.count(f"checkpoint {bare} lacks ['class_names']") == 2


def test_a_checkpoint_with_a_partial_config_runs_and_broken_entries_are_named(trained, tmp_path, capfd):
    checkpoint = load_checkpoint(trained["best"])
    # A config without its loss and eval sections (a hand-made or converted checkpoint) gets the defaults,
    # as the model was built with them; it used to stop with KeyError: 'loss'.
    partial = dict(checkpoint, config={k: v for k, v in checkpoint["config"].items() if k not in ("loss", "eval")})
    torch.save(partial, tmp_path / "partial.pt")
    image = tmp_path / "photo.jpg"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    assert detect_module.main(["--checkpoint", str(tmp_path / "partial.pt"), "--input", str(image),
                               "--output-dir", str(tmp_path / "d")]) == 0  # fmt: skip
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(tmp_path / "partial.pt"), "--output-dir",
                             str(tmp_path / "e"), *trained["overrides"]]) == 0  # fmt: skip
    broken = {
        "classes.pt": (dict(checkpoint, class_names=None), "'class_names' must be a list of class names, got None"),
        "ema.pt": (dict(checkpoint, ema={"decay": 0.9}), "'ema.module' is not a state dict (got NoneType)"),
        "model.pt": (dict(checkpoint, ema=None, model=[1, 2]), "'model' is not a state dict (got list)"),
    }
    capfd.readouterr()
    for name, (content, message) in broken.items():
        torch.save(content, tmp_path / name)
        assert detect_module.main(["--checkpoint", str(tmp_path / name), "--input", str(image),
                                   "--output-dir", str(tmp_path / "d")]) == 2  # fmt: skip
        assert f"checkpoint {tmp_path / name}: {message}" in capfd.readouterr().err


def test_image_ids_with_spaces_are_evaluated_without_results_files(trained, tmp_path, capfd, monkeypatch):
    real = eval_module.load_split_records

    def phone_photo_names(data, split):  # ids as labelImg gives them for photos such as "IMG 0001.jpg"
        records = real(data, split)
        for record in records:
            record.image_id = f"IMG {record.image_id}"
        return records

    out = tmp_path / "e"
    args = ["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir", str(out), *trained["overrides"]]
    assert eval_module.main(args) == 0
    expected = printed_map(capfd.readouterr().out)
    monkeypatch.setattr(eval_module, "load_split_records", phone_photo_names)
    for results in out.glob("comp4_det_test_*.txt"):
        results.unlink()
    assert eval_module.main(args) == 0
    captured = capfd.readouterr()
    assert printed_map(captured.out) == expected
    assert "VOC results files not written" in captured.err and "'IMG " in captured.err
    assert (out / "metrics.json").is_file() and not list(out.glob("comp4_det_test_*.txt"))


def test_eval_of_a_split_without_countable_boxes_is_named(trained, tmp_path, capfd, monkeypatch):
    real = eval_module.load_split_records

    def all_difficult(data, split):
        records = real(data, split)
        for record in records:
            record.difficult[:] = True
        return records

    monkeypatch.setattr(eval_module, "load_split_records", all_difficult)
    capfd.readouterr()
    assert eval_module.main(["--config", DEMO, "--checkpoint", str(trained["best"]), "--output-dir",
                             str(tmp_path / "e"), *trained["overrides"]]) == 2  # fmt: skip
    assert "the test split has no box that counts for mAP" in capfd.readouterr().err


def test_a_class_name_that_cannot_name_a_results_file_skips_the_files_with_a_warning(tmp_path, caplog):
    # "/" is legal in an XML <name>, not in a file name; the metrics were printed before the files are written.
    with caplog.at_level("WARNING"):
        eval_module.write_results_files(tmp_path, [], ["raccoon", "rac/coon"])
    assert list(tmp_path.iterdir()) == []
    assert "VOC results files not written: the class name 'rac/coon' cannot name a file" in caplog.text


def test_detect_goes_on_past_an_unreadable_image_and_says_so(trained, tmp_path, capfd):
    images = sorted((trained["root"] / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages").glob("*.jpg"))[:2]
    folder = tmp_path / "in"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "0-notes.jpg").write_text("not an image")  # first in order
    out = tmp_path / "out"
    assert detect_module.main(["--checkpoint", str(trained["best"]), "--input", str(folder),
                               "--output-dir", str(out)]) == 2
    err = capfd.readouterr().err
    assert "0-notes.jpg: cannot decode image" in err
    assert "1 of the 3 images could not be read (first: " in err and f"the others are in {out}" in err
    report = json.loads((out / "detections.json").read_text())
    assert [Path(r["image"]).name for r in report] == [image.name for image in images]


def test_detect_help_gives_the_defaults_and_a_bad_voting_iou_is_a_usage_error(capsys):
    help_text = detect_module.build_parser().format_help()
    for default in ("(default: detections)", "(default: 0.4)", "(default: 0.45)", "(default: 200)",
                    "(default: auto)"):
        assert default in " ".join(help_text.split()), default
    with pytest.raises(SystemExit) as info:
        detect_module.parse_args(["--checkpoint", "x.pt", "--input", "y.jpg", "--box-voting-iou", "1.5"])
    assert info.value.code == 2 and "--box-voting-iou: must be in [0, 1]" in capsys.readouterr().err
