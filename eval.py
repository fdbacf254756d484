"""Evaluate a checkpoint (or a folder of VOC results files) on the test split: VOC mAP and COCO metrics.

    python eval.py --config configs/voc.yaml --checkpoint checkpoints/voc/best.pt
    python eval.py --config configs/voc.yaml --results-dir my_detector_results/
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from data.dataset import DetectionDataset
from data.transforms import build_eval_transform
from model.loss import score_activation_for
from utils.atomic_file import atomic_file
from utils.builders import (
    checkpoint_config,
    detector_from_checkpoint,
    load_split_records,
    prepare_synthetic,
    settings_the_checkpoint_decides,
    settings_unlike_the_run,
    unlisted_random_split,
)
from utils.checkpoint import INFERENCE_KEYS, load_checkpoint, split_changes, trained_images_among
from utils.config import Config, load_config
from utils.distributed import DistributedContext
from utils.engine import resolve_amp_dtype, resolve_device, run_inference
from utils.errors import USER_ERRORS, user_message
from utils.evaluation import EvaluationResult, check_countable_boxes, evaluate_detections
from utils.output_dir import prepare_output_dir
from utils.pr_curves import plot_pr_curves
from utils.voc_results import read_voc_results, writable_class_name, writable_image_id, write_voc_results

logger = logging.getLogger("eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate the Tiny-Detector on the test split of a config's dataset: per-class VOC AP "
        "(VOC2007 11-point and VOC2010+ area), their means, and COCO-style metrics.",
        epilog="Config keys can be overridden with dotted key=value pairs among the flags, e.g. "
        "'data.root=/data/VOCdevkit eval.min_score=0.05'.",
    )
    parser.add_argument("--config", required=True, help="YAML config naming the dataset and eval settings")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a best.pt/last.pt written by train.py")
    source.add_argument(
        "--results-dir",
        help="evaluate comp4_det_test_<class>.txt files (lines 'image_id score xmin ymin xmax ymax', 1-based "
        "pixels) from any detector instead of running a model",
    )
    parser.add_argument(
        "--output-dir",
        help="where metrics.json, the results files and pr_curves.png go (default: eval/ beside the "
        "checkpoint, or the results dir itself)",
    )
    parser.add_argument("--no-coco", action="store_true", help="skip the COCO-style metrics")
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's train.device)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Intermixed: overrides may come before, between or after the flags ('... train.epochs=2 --no-progress').
    return build_parser().parse_intermixed_args(argv)


def format_coco(coco: dict[str, Any] | None) -> str:
    if not coco:
        return ""
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    parts = [f"{name} {coco[name]:.4f}" if coco.get(name) is not None else f"{name} n/a" for name in names]
    return "COCO: " + ", ".join(parts)


def report(result: EvaluationResult, output_dir: Path, extra: dict[str, Any]) -> None:
    print(result.voc.format_table())
    print(f"VOC07 mAP (11-point): {result.voc.voc07_map:.4f}")
    print(f"VOC12 mAP (area):     {result.voc.voc12_map:.4f}")
    if result.coco:
        print(format_coco(result.coco))
    metrics = result.to_dict() | extra
    with atomic_file(output_dir / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    plot_pr_curves(result.voc, output_dir / "pr_curves.png")
    print(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'pr_curves.png'}")


def write_results_files(output_dir: Path, detections: list, class_names: list[str]) -> None:
    """The devkit's per-class results files, unless a class name cannot name one or an image id cannot be
    written in one (a warning says so)."""
    unnamable = [name for name in class_names if not writable_class_name(name)]
    if unnamable:
        logger.warning(
            "VOC results files not written: the class name %r cannot name a file (a path separator); the metrics "
            "above cover every class", unnamable[0]
        )
        return
    unwritable = [d.image_id for d in detections if not writable_image_id(d.image_id)]
    if unwritable:
        logger.warning(
            "VOC results files not written: %d image ids contain whitespace, which their lines cannot hold "
            "(first: %r); the metrics above cover every image", len(unwritable), unwritable[0]
        )
        return
    write_voc_results(output_dir, detections, class_names)


def warn_where_unlike_the_run(cfg: Config, saved: Config, checkpoint: dict[str, Any], path: str,
                              records: list) -> None:
    """Warn where this evaluation is not the one the checkpoint's run made: the data and the `eval.*`
    settings come from --config, the model from the checkpoint."""
    trained = trained_images_among(checkpoint, records)
    if trained:
        logger.warning("%d of the %d test images were training images of %s (first: %s): their mAP is not a test "
                       "of the model", len(trained), len(records), path, trained[0])
    why = unlisted_random_split(cfg.data, checkpoint)
    if why:
        logger.warning("%s: %s", path, why)
    saved_ids = checkpoint.get("data_ids")
    if isinstance(saved_ids, dict):
        changed = split_changes(saved_ids, {"test": [r.image_id for r in records]}, parts=("test",),
                                order_matters=False)
        if changed:
            logger.warning("%s: %s: these metrics are not comparable with those of the run (check the data keys "
                           "of --config and the overrides)", path, changed[0])
    unused = settings_the_checkpoint_decides(cfg, saved)
    if unused:
        logger.warning("the model is rebuilt as %s was trained, so these settings of --config and the overrides "
                       "are not used: %s", path, ", ".join(unused))
    unlike = settings_unlike_the_run(cfg, saved)
    if unlike:
        logger.warning("%s: these settings of --config and the overrides differ from the run's, so the mAP is not "
                       "the one it logged: %s", path, ", ".join(unlike))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    try:
        cfg = load_config(args.config, args.overrides)
        class_names = list(cfg.data.classes)
        prepare_synthetic(cfg.data)
        records = load_split_records(cfg.data, "test")
        check_countable_boxes(records, "test split")
        output_flag = "--output-dir" if args.output_dir else "output folder (default of --output-dir)"
        if args.results_dir:
            results_dir = Path(args.results_dir)
            detections = read_voc_results(results_dir, class_names, [r.image_id for r in records])
            output_dir = prepare_output_dir(Path(args.output_dir or results_dir), output_flag)
            extra = {"results_dir": str(results_dir)}
        else:
            if args.device is None:
                device = resolve_device(cfg.train.device)
            else:
                device = resolve_device(args.device, "--device")
            checkpoint = load_checkpoint(args.checkpoint, map_location="cpu", require=INFERENCE_KEYS)
            detector = detector_from_checkpoint(checkpoint, args.checkpoint, class_names).to(device)
            saved = checkpoint_config(checkpoint, args.checkpoint)
            warn_where_unlike_the_run(cfg, saved, checkpoint, args.checkpoint, records)
            default_dir = Path(args.checkpoint).parent / "eval"
            output_dir = prepare_output_dir(Path(args.output_dir or default_dir), output_flag)
            channels_last = cfg.train.channels_last
            if channels_last:
                detector = detector.to(memory_format=torch.channels_last)
            image_size = detector.image_size
            dataset = DetectionDataset(records, build_eval_transform(image_size), use_difficult=True)
            detections = run_inference(
                detector, dataset, records, device,
                batch_size=cfg.eval.batch_size, num_workers=min(cfg.data.num_workers, 2),
                amp_dtype=resolve_amp_dtype(cfg.train.amp, device), channels_last=channels_last,
                min_score=cfg.eval.min_score, max_overlap=cfg.eval.max_overlap, top_k=cfg.eval.top_k,
                context=DistributedContext(),
                activation=score_activation_for(saved.loss.classification),
                box_voting_iou=cfg.eval.box_voting_iou,
            )  # fmt: skip
            extra = {"checkpoint": str(args.checkpoint), "epoch": checkpoint.get("epoch")}
        result = evaluate_detections(detections, records, class_names, coco=cfg.eval.coco_metrics and not args.no_coco)
        report(result, output_dir, extra | {"n_images": len(records)})
        if not args.results_dir:  # after the metrics, which do not depend on them
            write_results_files(output_dir, detections, class_names)
    except USER_ERRORS as error:
        logger.error("%s", user_message(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
