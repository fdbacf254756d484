"""detect.py's flag checks and output names, without a model (the end-to-end runs are in test_eval_cli.py)."""

from pathlib import Path

import pytest
import torch

import detect
from utils.config import ConfigError
from utils.engine import resolve_device

REQUIRED = ["--checkpoint", "best.pt", "--input", "photo.jpg"]


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--min-score", "1"), ("--min-score", "2"), ("--min-score", "-0.1"), ("--min-score", "nan"),
     ("--max-overlap", "0"), ("--max-overlap", "-1"), ("--max-overlap", "1.5"), ("--top-k", "0"),
     ("--top-k", "-3"), ("--top-k", "2.5"), ("--min-score", "high")],
)  # fmt: skip
def test_out_of_range_flags_are_refused_by_name(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        detect.parse_args([*REQUIRED, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err
    assert value in err


def test_range_ends_are_accepted():
    args = detect.parse_args([*REQUIRED, "--min-score", "0", "--max-overlap", "1", "--top-k", "1"])
    assert (args.min_score, args.max_overlap, args.top_k) == (0.0, 1.0, 1)


def test_output_names_are_unique_and_keep_folders():
    names = detect.output_names([Path("trips/a/x.jpg"), Path("trips/b/x.jpg"), Path("trips/b/y.jpg")])
    assert names == [Path("a/x_detections.jpg"), Path("b/x_detections.jpg"), Path("b/y_detections.jpg")]
    # One folder, as from a folder or a plain glob: flat names, as before.
    assert detect.output_names([Path("in/x.jpg"), Path("in/y.png")]) == [
        Path("x_detections.jpg"), Path("y_detections.jpg")]  # fmt: skip
    names = detect.output_names([Path("in/x.jpg"), Path("in/x.png"), Path("in/x.JPG")])
    assert names == [Path("x_jpg_detections.jpg"), Path("x_png_detections.jpg"), Path("x_JPG_2_detections.jpg")]


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "meta", ""])
def test_bad_device_names_its_source(name):
    with pytest.raises(ConfigError, match=r"^--device is .*expected auto, cpu, cuda or cuda:N"):
        resolve_device(name, "--device")
    with pytest.raises(ConfigError, match=r"^config key 'train.device' is "):
        resolve_device(name)


def test_missing_cuda_names_its_source(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device is 'cuda:0' but CUDA is not available"):
        resolve_device("cuda:0", "--device")
    assert resolve_device("auto", "--device") == torch.device("cpu")
    assert resolve_device("cpu", "--device") == torch.device("cpu")


@pytest.mark.parametrize(("side", "thickness"), [(150, 1), (600, 3), (1200, 6)])
def test_a_box_on_the_image_border_is_drawn_whole(side, thickness):
    import numpy as np

    image = np.zeros((side, side, 3), np.uint8)
    box = {"box": [10.0, 10.0, float(side), float(side)], "label": 1, "class": "cat", "score": 0.9}
    drawn = detect.draw_detections(image, [box]).any(axis=2)
    # Its right and bottom edges were drawn half (or, 1 pixel thick, not at all) past the last pixel: they
    # must reach the last pixel and be as wide as the left and top edges.
    half = side // 2
    for line in (drawn[half], drawn[:, half]):  # across the left and right edges, the top and bottom ones
        assert line[-1] and line[half:].sum() == line[10 - thickness:half].sum() >= thickness


def test_a_missing_input_is_named_as_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(detect.InputError, match=rf"--input 'nope.jpg': no such file or folder \(relative to {tmp_path}\)"):
        detect.resolve_inputs("nope.jpg")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(detect.InputError, match="no image files found"):
        detect.resolve_inputs(str(tmp_path))  # a folder without images
    with pytest.raises(detect.InputError, match="no image files found"):
        detect.resolve_inputs("*.jpg")  # a pattern matching nothing
