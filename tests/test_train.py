"""train.py end to end on tiny data: exact resume, interruption, NaN guard, metrics, multi-process DDP."""

import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as eval_module
import train as train_module
from data.errors import DataError, ImageReadError
from data.sampler import SeededSamples
from tests.train_helpers import REPO, state_dicts_equal, tiny_config, tiny_overrides
from utils.checkpoint import CheckpointError, load_checkpoint, split_id_list
from utils.config import ConfigError, load_config
from utils.engine import NonFiniteLossError, keep_freed_memory_in_process


def run_dir(cfg):
    return os.path.join(cfg.run.output_dir, cfg.run.name)


class SimulatedCrash(RuntimeError):
    pass


def crash_at_loss_call(monkeypatch, call_number, make_output=None):
    """Make the criterion built by train.py fail (or return `make_output(out)`) at its N-th call."""
    real_build = train_module.build_criterion

    def build(loss_cfg, detector):
        criterion = real_build(loss_cfg, detector)
        calls = {"n": 0}
        real_forward = criterion.forward

        def forward(*args):
            calls["n"] += 1
            out = real_forward(*args)
            if calls["n"] == call_number:
                if make_output is None:
                    raise SimulatedCrash("power cut")
                return make_output(out)
            return out

        criterion.forward = forward
        return criterion

    monkeypatch.setattr(train_module, "build_criterion", build)


def uninterrupted_weights(tmp_path):
    """Final weights of the tiny 2-epoch run trained straight through."""
    straight = tiny_config(tmp_path, name="straight", epochs=2)
    train_module.train(straight, show_progress=False)
    return load_checkpoint(os.path.join(run_dir(straight), "last.pt"))["model"]


def test_same_seed_same_weights_and_exact_resume(tmp_path, monkeypatch):
    straight = tiny_config(tmp_path, name="straight", epochs=2)
    summary = train_module.train(straight, show_progress=False)
    assert summary["epochs_done"] == 2 and summary["global_step"] == 6  # 12 images / batch 4 = 3 steps
    weights_straight = load_checkpoint(os.path.join(run_dir(straight), "last.pt"))["model"]

    again = tiny_config(tmp_path, name="again", epochs=2)
    train_module.train(again, show_progress=False)
    assert state_dicts_equal(load_checkpoint(os.path.join(run_dir(again), "last.pt"))["model"], weights_straight)

    # The same 2-epoch run dies during epoch 2; its last.pt is the end of epoch 1.
    crashed = tiny_config(tmp_path, name="crashed", epochs=2)
    crash_at_loss_call(monkeypatch, call_number=5)
    with pytest.raises(SimulatedCrash):
        train_module.train(crashed, show_progress=False)
    monkeypatch.undo()
    last = os.path.join(run_dir(crashed), "last.pt")
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (1, 0, 3)
    assert not state_dicts_equal(checkpoint["model"], weights_straight)
    assert train_module.main(["--resume", last, "--no-progress"]) == 0
    assert state_dicts_equal(load_checkpoint(last)["model"], weights_straight)


def test_interrupt_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch):
    expected = uninterrupted_weights(tmp_path)

    polls = {"n": 0}

    def stop_after_four_steps(self):
        # Polled after each step and once after each epoch: polls 1-3 are epoch 1's steps, 4 its end,
        # 5 the first step of epoch 2.
        polls["n"] += 1
        return polls["n"] >= 5

    monkeypatch.setattr(train_module.StopRequest, "__call__", stop_after_four_steps)
    cfg = tiny_config(tmp_path, name="interrupted", epochs=2)
    summary = train_module.train(cfg, show_progress=False)
    assert summary["interrupted"] and summary["global_step"] == 4
    last = os.path.join(run_dir(cfg), "last.pt")
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (1, 1, 4)
    monkeypatch.undo()
    assert train_module.main(["--resume", last, "--no-progress"]) == 0
    assert state_dicts_equal(load_checkpoint(last)["model"], expected)


def test_resume_restores_optimizer_and_schedule(tmp_path):
    cfg = tiny_config(tmp_path, name="opt", epochs=1)
    train_module.train(cfg, show_progress=False)
    checkpoint = load_checkpoint(os.path.join(run_dir(cfg), "last.pt"))
    assert checkpoint["scheduler"]["last_epoch"] == 3
    lrs = [group["lr"] for group in checkpoint["optimizer"]["param_groups"]]
    assert lrs[0] != cfg.train.lr  # the cosine schedule moved it; resume must bring this value back
    assert checkpoint["config"]["train"]["epochs"] == 1 and checkpoint["class_names"] == list(cfg.data.classes)


def test_metrics_log_and_resolved_config_are_written(tmp_path):
    cfg = tiny_config(tmp_path, name="logged", epochs=2)
    summary = train_module.train(cfg, show_progress=False)
    folder = run_dir(cfg)
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    train_records = [r for r in records if r["type"] == "train"]
    eval_records = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "localization", "confidence", "lr", "images_per_s"} <= r.keys() for r in train_records)
    assert [r["epoch"] for r in eval_records] == [1, 2]
    assert summary["best_voc07_map"] == max(r["voc07_map"] for r in eval_records)
    saved = load_config(os.path.join(folder, "config.yaml"))
    assert saved.train.epochs == 2 and saved.model.width_mult == 0.0625
    best = load_checkpoint(os.path.join(folder, "best.pt"))
    assert best["best_map"] == summary["best_voc07_map"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, name="nan", epochs=2)
    crash_at_loss_call(monkeypatch, call_number=5, make_output=lambda out: out._replace(total=out.total * float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 5"):
        train_module.train(cfg, show_progress=False)
    checkpoint = load_checkpoint(os.path.join(run_dir(cfg), "last.pt"))
    assert (checkpoint["epoch"], checkpoint["batches_done"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


def test_cli_reports_config_errors_by_key(capfd):
    code = train_module.main(["--config", str(REPO / "configs" / "demo.yaml"), "train.epochz=2"])
    assert code == 2
    assert "unknown config key 'train.epochz'" in capfd.readouterr().err


def test_sigterm_saves_last_checkpoint(tmp_path):
    overrides = tiny_overrides(tmp_path, name="sig", epochs=200) + ["train.eval_every_epochs=0"]
    process = subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/demo.yaml", "--no-progress", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    metrics = tmp_path / "runs" / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "SIGTERM received" in output
    checkpoint = load_checkpoint(tmp_path / "runs" / "sig" / "last.pt")
    assert checkpoint["global_step"] >= 2
    assert checkpoint["epoch"] * 3 + checkpoint["batches_done"] == checkpoint["global_step"]


# train.py with each sample taking SLOW_SECONDS to load, so the main process spends its time waiting for
# batches; the evaluation's loader workers touch the file named by EVALUATING as they start on an image.
SLOW_LOADING_TRAIN = """
import os, pathlib, sys, time
from data.dataset import DetectionDataset
from utils import engine
load = DetectionDataset.__getitem__
delay = float(os.environ["SLOW_SECONDS"])
DetectionDataset.__getitem__ = lambda self, index: (time.sleep(delay), load(self, index))[1]
load_for_inference = engine._IndexedImages.__getitem__
def marked(self, position):
    pathlib.Path(os.environ["EVALUATING"]).touch()
    return load_for_inference(self, position)
engine._IndexedImages.__getitem__ = marked
import train
sys.exit(train.main(sys.argv[1:]))
"""


def start_slow_job(tmp_path, overrides, seconds_per_sample):
    """train.py with SLOW_LOADING_TRAIN in a process group of its own, as a scheduler's job."""
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_LOADING_TRAIN, "--config", "configs/demo.yaml", "--no-progress", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, EVALUATING=str(tmp_path / "evaluating"), SLOW_SECONDS=str(seconds_per_sample)),
    )  # fmt: skip


def test_a_sigterm_to_the_whole_job_saves_the_last_step_though_it_kills_the_loader_workers(tmp_path):
    # SLURM's scancel, systemd and `kill -- -PGID` send it to every process, the loader's workers included.
    # They die while the main process waits for their next batch: each worker needs 4 s for a batch of 4, and
    # the signal comes when the first two batches have been trained on, seconds before the third is ready.
    overrides = tiny_overrides(tmp_path, name="job", epochs=200) + ["train.eval_every_epochs=0",
                                                                     "data.num_workers=2"]
    process = start_slow_job(tmp_path, overrides, seconds_per_sample=1.0)
    metrics = tmp_path / "runs" / "job" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "the next batch could not be loaded after the stop request" in output
    assert "Traceback" not in output and "race condition" not in output
    checkpoint = load_checkpoint(tmp_path / "runs" / "job" / "last.pt")
    logged_steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert checkpoint["global_step"] == logged_steps[-1] >= 2
    assert checkpoint["epoch"] * 3 + checkpoint["batches_done"] == checkpoint["global_step"]


class _OneBatchThenWorkerGone:
    """A loader whose worker dies after the first batch, the way torch reports one that died while handing over
    a batch (the connection to it reset)."""

    def __iter__(self):
        yield (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), [torch.tensor([[0.1, 0.1, 0.6, 0.6]])] * 2,
               [torch.tensor([1])] * 2, [torch.tensor([False])] * 2)
        raise ConnectionResetError(104, "Connection reset by peer")


class _WorkersGoneAtEpochStart:
    """A loader with persistent workers that died before the epoch started: starting it fails."""

    def __iter__(self):
        raise EOFError


def test_a_batch_that_cannot_be_loaded_after_a_stop_request_ends_the_epoch_at_the_last_step(caplog):
    from model.detector import TinyDetector
    from model.loss import MultiBoxLoss
    from utils.distributed import DistributedContext
    from utils.engine import train_one_epoch

    model = TinyDetector(2, width_mult=0.0625, image_size=64, pretrained=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def run(stop_signalled, loader=None):
        return train_one_epoch(
            model, MultiBoxLoss(model.priors_cxcywh), loader or _OneBatchThenWorkerGone(), optimizer,
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), torch.amp.GradScaler("cpu", enabled=False),
            torch.device("cpu"), epoch=1, global_step=7, total_batches=2, amp_dtype=None, channels_last=False,
            grad_clip_norm=None, context=DistributedContext(0, 0, 1), show_progress=False,
            stop_signalled=stop_signalled,
        )  # fmt: skip

    assert run(lambda: True) == (8, True)
    assert "could not be loaded after the stop request (ConnectionResetError: [Errno 104] Connection reset by " \
           "peer): stopping after step 8" in caplog.text
    with pytest.raises(ConnectionResetError):  # without a stop request it is an error
        run(lambda: False)
    with pytest.raises(ConnectionResetError):
        run(None)
    assert run(lambda: True, _WorkersGoneAtEpochStart()) == (7, True)
    assert "after the stop request (EOFError): stopping after step 7" in caplog.text
    with pytest.raises(EOFError):
        run(lambda: False, _WorkersGoneAtEpochStart())


def test_a_job_wide_sigterm_during_the_evaluation_saves_the_epoch_and_the_resume_evaluates_it(tmp_path):
    # The evaluation's loader has workers of its own, which the signal kills while they load its images.
    expected = uninterrupted_weights(tmp_path)
    overrides = tiny_overrides(tmp_path, name="job", epochs=2) + ["data.num_workers=2"]
    process = start_slow_job(tmp_path, overrides, seconds_per_sample=0.3)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "evaluating").exists():
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "epoch 1's evaluation failed after the stop request" in output
    assert "Traceback" not in output
    last = tmp_path / "runs" / "job" / "last.pt"
    checkpoint = load_checkpoint(last)
    # On epoch 1's last step, as a checkpoint taken there by train.save_every_steps.
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (0, 3, 3)

    assert train_module.main(["--resume", str(last), "--no-progress"]) == 0
    assert state_dicts_equal(load_checkpoint(last)["model"], expected)
    evaluations = [json.loads(line) for line in (tmp_path / "runs" / "job" / "metrics.jsonl").read_text().splitlines()
                   if '"eval"' in line]
    assert [(e["epoch"], e["step"]) for e in evaluations] == [(1, 3), (2, 6)]


def test_a_stop_request_replaces_torchs_raise_on_worker_death_handler_for_good():
    def torch_like_handler(signum, frame):  # torch installs one with the first multi-process loader
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    previous = signal.signal(signal.SIGCHLD, torch_like_handler)
    stop = train_module.StopRequest()
    stop.install()
    try:
        assert signal.getsignal(signal.SIGCHLD) is torch_like_handler
        stop._handle(signal.SIGTERM, None)
        during_stop = signal.getsignal(signal.SIGCHLD)
    finally:
        stop.restore()
        restored = signal.getsignal(signal.SIGCHLD)
        signal.signal(signal.SIGCHLD, previous)
    # A Python function, so a SIGCHLD already pending finds a handler; kept after the run, when the loaders
    # shut down and reap their dead workers.
    assert callable(during_stop) and during_stop is not torch_like_handler
    during_stop(signal.SIGCHLD, None)  # does nothing
    assert restored is during_stop


def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    overrides = tiny_overrides(tmp_path, name="ddp", epochs=2) + ["train.batch_size=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "train.py", "--config", "configs/demo.yaml", "--no-progress", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["rank_weight_checksums"]) == 2
    assert summary["rank_weight_checksums"][0] == summary["rank_weight_checksums"][1]
    assert summary["global_step"] == 6  # 12 images / (2 ranks x batch 2) = 3 steps per epoch
    assert summary["best_voc07_map"] is not None
    # The mAP the run logged is that of the checkpoint it saved: each rank scored its shard with rank 0's
    # BatchNorm statistics, not with those of its own last batch.
    out = tmp_path / "eval"
    assert eval_module.main(["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint",
                             str(tmp_path / "runs" / "ddp" / "last.pt"), "--output-dir", str(out), "--no-coco",
                             *overrides]) == 0  # fmt: skip
    evaluated = json.loads((out / "metrics.json").read_text())["voc07_map"]
    assert evaluated == pytest.approx(summary["last_voc07_map"], abs=1e-9)


def test_periodic_step_checkpoint_survives_a_crash_and_resumes_exactly(tmp_path, monkeypatch):
    expected = uninterrupted_weights(tmp_path)

    crashed = tiny_config(tmp_path, name="steps", epochs=2)
    crashed.train.save_every_steps = 2
    crash_at_loss_call(monkeypatch, call_number=3)  # dies in step 3, after the step-2 checkpoint
    with pytest.raises(SimulatedCrash):
        train_module.train(crashed, show_progress=False)
    monkeypatch.undo()
    last = os.path.join(run_dir(crashed), "last.pt")
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (0, 2, 2)
    assert train_module.main(["--resume", last, "--no-progress"]) == 0
    assert state_dicts_equal(load_checkpoint(last)["model"], expected)


def test_offline_pretrained_weights_stop_with_instructions(tmp_path, monkeypatch, capfd):
    import urllib.error

    import model.vgg

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(model.vgg, "load_state_dict_from_url", offline)
    overrides = tiny_overrides(tmp_path, name="pre", epochs=1)
    code = train_module.main(["--config", str(REPO / "configs" / "demo.yaml"), *overrides,
                              "model.pretrained=true", "model.width_mult=1.0"])  # fmt: skip
    assert code == 2
    err = capfd.readouterr().err
    assert "could not download the ImageNet VGG16 weights" in err and "model.weights_path=" in err
    assert "Traceback" not in err

    code = train_module.main(["--config", str(REPO / "configs" / "demo.yaml"), *overrides, "model.pretrained=true"])
    assert code == 2
    assert "width_mult=1.0" in capfd.readouterr().err


def test_a_run_started_from_imagenet_weights_resumes_without_them(tmp_path, monkeypatch):
    from tests.test_model import torchvision_state_dict

    weights = tmp_path / "vgg16.pth"
    torch.save(torchvision_state_dict(batch_norm=True), weights)  # the demo model is VGG16-BN
    overrides = tiny_overrides(tmp_path, name="pre", epochs=1)
    assert train_module.main(["--config", str(REPO / "configs" / "demo.yaml"), "--no-progress", *overrides,
                              "model.pretrained=true", f"model.weights_path={weights}", "model.width_mult=1.0"]) == 0
    # The file is gone (or the machine offline): last.pt holds every weight, so the resume does not need it.
    weights.unlink()
    monkeypatch.setattr("model.vgg.load_state_dict_from_url", lambda *args, **kwargs: pytest.fail("downloaded"))
    last = tmp_path / "runs" / "pre" / "last.pt"
    assert train_module.main(["--resume", str(last), "--no-progress", "train.epochs=2"]) == 0
    assert load_checkpoint(last)["epoch"] == 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_activation_memory_stays_in_the_process_on_glibc():
    assert keep_freed_memory_in_process() is True


def metric_records(folder):
    """metrics.jsonl without its wall-clock fields, which differ between any two runs."""
    lines = (Path(folder) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "images_per_s")} for line in lines]


def test_metrics_after_a_crash_and_resume_read_as_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = tiny_config(tmp_path, name="straight", epochs=3)
    train_module.train(straight, show_progress=False)
    # Dies at the 3rd step of epoch 3, after logging steps 7 and 8 that its last.pt (step 6) lacks.
    crashed = tiny_config(tmp_path, name="crashed", epochs=3)
    crash_at_loss_call(monkeypatch, call_number=9)
    with pytest.raises(SimulatedCrash):
        train_module.train(crashed, show_progress=False)
    monkeypatch.undo()
    assert [r["step"] for r in metric_records(run_dir(crashed)) if r["type"] == "train"][-2:] == [7, 8]
    assert train_module.main(["--resume", os.path.join(run_dir(crashed), "last.pt"), "--no-progress"]) == 0
    assert metric_records(run_dir(crashed)) == metric_records(run_dir(straight))


def test_a_resume_with_more_epochs_steps_at_the_longer_schedule_rates(tmp_path):
    longer = tiny_config(tmp_path, name="longer", epochs=3)
    train_module.train(longer, show_progress=False)
    extended = tiny_config(tmp_path, name="extended", epochs=2)
    train_module.train(extended, show_progress=False)
    last = os.path.join(run_dir(extended), "last.pt")
    assert train_module.main(["--resume", last, "--no-progress", "train.epochs=3"]) == 0

    def third_epoch_rates(folder):
        return [r["lr"] for r in metric_records(folder) if r["type"] == "train" and r["epoch"] == 3]

    # The first resumed step used the 2-epoch schedule's last rate (its cosine floor) before.
    assert third_epoch_rates(run_dir(extended)) == third_epoch_rates(run_dir(longer))


def test_resume_refuses_changes_that_do_not_fit_the_run_and_leaves_its_files(tmp_path, capfd):
    cfg = tiny_config(tmp_path, name="fixed", epochs=1)
    train_module.train(cfg, show_progress=False)
    folder = Path(run_dir(cfg))
    last = str(folder / "last.pt")
    config_before, checkpoint_before = (folder / "config.yaml").read_text(), (folder / "last.pt").read_bytes()
    for override in ("model.width_mult=0.125", "train.optimizer=sgd", "train.lr=1.0", "train.batch_size=2",
                     "run.seed=5"):
        capfd.readouterr()
        assert train_module.main(["--resume", last, "--no-progress", "train.epochs=2", override]) == 2
        key, value = override.split("=")
        error = capfd.readouterr().err.replace("'", "")
        assert f"{key}: " in error and f"-> {value}" in error and "cannot change" in error
    # Nothing of the run was touched by the refused attempts.
    assert (folder / "config.yaml").read_text() == config_before
    assert (folder / "last.pt").read_bytes() == checkpoint_before
    # What a resumed run may change still applies.
    assert train_module.main(["--resume", last, "--no-progress", "train.epochs=2", "eval.top_k=50"]) == 0
    assert load_checkpoint(last)["config"]["eval"]["top_k"] == 50 and load_checkpoint(last)["epoch"] == 2


def test_a_copied_run_resumes_in_its_own_folder(tmp_path):
    cfg = tiny_config(tmp_path, name="original", epochs=1)
    train_module.train(cfg, show_progress=False)
    original = Path(run_dir(cfg))
    before = (original / "last.pt").read_bytes()
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, copy)
    assert train_module.main(["--resume", str(copy / "last.pt"), "--no-progress", "train.epochs=2"]) == 0
    assert (original / "last.pt").read_bytes() == before
    assert load_checkpoint(copy / "last.pt")["epoch"] == 2
    assert load_checkpoint(copy / "last.pt")["config"]["run"]["name"] == "copy"


def test_a_new_run_does_not_overwrite_a_folder_holding_one(tmp_path, capfd):
    cfg = tiny_config(tmp_path, name="taken", epochs=1)
    train_module.train(cfg, show_progress=False)
    before = (Path(run_dir(cfg)) / "last.pt").read_bytes()
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--no-progress",
            *tiny_overrides(tmp_path, name="taken", epochs=1), "run.seed=5"]
    capfd.readouterr()
    assert train_module.main(argv) == 2
    assert "already holds a run (last.pt): continue it with --resume" in capfd.readouterr().err
    assert (Path(run_dir(cfg)) / "last.pt").read_bytes() == before
    # Nor does a resume of another run sent there by run.name; into an empty folder it may go.
    other = tiny_config(tmp_path, name="other", epochs=1)
    train_module.train(other, show_progress=False)
    other_last = str(Path(run_dir(other)) / "last.pt")
    assert train_module.main(["--resume", other_last, "--no-progress", "train.epochs=2", "run.name=taken"]) == 2
    assert "taken already holds a run (last.pt)" in capfd.readouterr().err
    assert (Path(run_dir(cfg)) / "last.pt").read_bytes() == before
    assert train_module.main(["--resume", other_last, "--no-progress", "train.epochs=2", "run.name=fork"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "fork" / "last.pt")["epoch"] == 2
    # The same as a section mapping: it went on in the original folder.
    assert train_module.main(["--resume", other_last, "--no-progress", "train.epochs=2", "run={name: fork2}"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "fork2" / "last.pt")["epoch"] == 2
    assert load_checkpoint(other_last)["epoch"] == 1


def test_a_checkpoint_without_the_training_state_is_named(tmp_path, capfd):
    cfg = tiny_config(tmp_path, name="weights", epochs=1)
    train_module.train(cfg, show_progress=False)
    checkpoint = load_checkpoint(os.path.join(run_dir(cfg), "last.pt"))
    bare = tmp_path / "weights_only.pt"
    torch.save({"model": checkpoint["model"]}, bare)
    capfd.readouterr()
    assert train_module.main(["--resume", str(bare), "--no-progress"]) == 2
    assert f"checkpoint {bare} lacks ['config', 'class_names', 'optimizer'" in capfd.readouterr().err


def test_a_checkpoint_resumes_with_its_number_of_processes(tmp_path):
    cfg = tiny_config(tmp_path, name="ranks", epochs=2)
    train_module.train(cfg, show_progress=False)
    last = Path(run_dir(cfg)) / "last.pt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["world_size"] == 1
    # At an epoch boundary too: the schedule counts steps, and a step's batch depends on the process count.
    checkpoint.update(epoch=1, batches_done=0, world_size=2)
    torch.save(checkpoint, last)
    with pytest.raises(CheckpointError, match=r"saved by a run of 2 processes; resume it with 2, not 1"):
        train_module.train(train_module.config_for_resume(last, []), resume=str(last), show_progress=False)


def test_a_test_split_without_countable_boxes_stops_before_training(tmp_path, monkeypatch):
    real_build = train_module.build_datasets

    def all_difficult(cfg):
        train_dataset, test_dataset = real_build(cfg)
        for record in test_dataset.records:
            record.difficult[:] = True
        return train_dataset, test_dataset

    monkeypatch.setattr(train_module, "build_datasets", all_difficult)
    with pytest.raises(DataError, match=r"the test split has no box that counts for mAP: 6 images, \d+ boxes kept, "
                                         r"\d+ of them difficult"):
        train_module.train(tiny_config(tmp_path, name="difficult", epochs=1), show_progress=False)


def test_each_logged_step_shows_the_learning_rate_it_used(tmp_path):
    cfg = tiny_config(tmp_path, name="lr", epochs=2)
    train_module.train(cfg, show_progress=False)
    factor = train_module.steps_lr_lambda(
        total_steps=6, steps_per_epoch=3, warmup_epochs=cfg.train.warmup_epochs, schedule=cfg.train.schedule,
        milestones=cfg.train.milestones, gamma=cfg.train.gamma, min_lr_ratio=cfg.train.min_lr_ratio,
    )  # fmt: skip
    logged = [(r["step"], r["lr"]) for r in metric_records(run_dir(cfg)) if r["type"] == "train"]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    for step, lr in logged:
        assert lr == pytest.approx(cfg.train.lr * factor(step - 1), rel=1e-12), step  # step k runs factor(k - 1)


def test_weights_that_turn_non_finite_with_a_finite_loss_are_not_saved(tmp_path, monkeypatch):
    real_train_one_epoch = train_module.train_one_epoch
    diverge_at = {"step": 5}  # in epoch 2

    def diverging(model, *args, on_step, **kwargs):
        def step(stats):
            if stats.step == diverge_at["step"]:  # a diverged BatchNorm statistic; training uses batch statistics
                with torch.no_grad():
                    model.base[1].running_var.fill_(math.inf)
            on_step(stats)

        return real_train_one_epoch(model, *args, on_step=step, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", diverging)
    cfg = tiny_config(tmp_path, name="diverged", epochs=2)
    with pytest.raises(NonFiniteLossError, match=r"weights became NaN or infinite by step 6 \(base\.1\.running_var\)"
                                                 r".*last.pt was not written, so it keeps the last good state"):
        train_module.train(cfg, show_progress=False)
    assert load_checkpoint(Path(run_dir(cfg)) / "last.pt")["global_step"] == 3  # epoch 1's, intact
    # In the first epoch there is no checkpoint to keep.
    diverge_at["step"] = 2
    cfg = tiny_config(tmp_path, name="diverged_at_once", epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"last.pt was not written \(there was none yet\)"):
        train_module.train(cfg, show_progress=False)


def test_a_run_saved_without_fp16_resumes_under_fp16(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, name="to_fp16", epochs=1)
    train_module.train(cfg, show_progress=False)
    last = Path(run_dir(cfg)) / "last.pt"
    assert load_checkpoint(last)["scaler"] == {}  # no scaler without fp16
    # fp16 autocast is CUDA-only; a CPU run stands in for a resume on a GPU with train.amp=fp16.
    monkeypatch.setattr(train_module, "resolve_amp_dtype", lambda amp, device: torch.float16)
    resumed = train_module.config_for_resume(last, ["train.epochs=2"])
    summary = train_module.train(resumed, resume=str(last), show_progress=False)
    assert summary["epochs_done"] == 2 and load_checkpoint(last)["scaler"]["scale"] > 0


def test_a_stop_during_the_last_evaluation_finds_the_run_complete(tmp_path, monkeypatch):
    polls = {"n": 0}

    def stop_after_the_last_step(self):
        polls["n"] += 1
        return polls["n"] > 3  # 3 steps in the only epoch; the request lands during its evaluation

    monkeypatch.setattr(train_module.StopRequest, "__call__", stop_after_the_last_step)
    summary = train_module.train(tiny_config(tmp_path, name="done", epochs=1), show_progress=False)
    assert not summary["interrupted"] and summary["epochs_done"] == 1


def test_a_run_that_reached_stop_at_map_is_complete_even_when_stopped_during_that_evaluation(tmp_path, monkeypatch):
    def stopping_config(name):
        return load_config(REPO / "configs" / "demo.yaml",
                           tiny_overrides(tmp_path, name=name, epochs=4) + ["train.stop_at_map=1e-6"])

    straight = train_module.train(stopping_config("straight"), show_progress=False)
    assert straight["epochs_done"] == 1 and not straight["interrupted"] and straight["last_voc07_map"] > 1e-6
    polls = {"n": 0}

    def stop_during_the_first_evaluation(self):
        polls["n"] += 1
        return polls["n"] > 3  # 3 steps per epoch

    monkeypatch.setattr(train_module.StopRequest, "__call__", stop_during_the_first_evaluation)
    stopped = train_module.train(stopping_config("stopped"), show_progress=False)
    monkeypatch.undo()
    # It reached the stop: complete, not interrupted (a resume trained on to epoch 2 before).
    assert stopped["epochs_done"] == 1 and not stopped["interrupted"]
    # Resuming a run that stopped on stop_at_map trains nothing, as for one that ran all its epochs.
    for name in ("straight", "stopped"):
        last = tmp_path / "runs" / name / "last.pt"
        before = last.read_bytes()
        assert train_module.main(["--resume", str(last), "--no-progress"]) == 0
        assert last.read_bytes() == before
    assert metric_records(tmp_path / "runs" / "stopped") == metric_records(tmp_path / "runs" / "straight")


def test_a_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, capfd):
    cfg = tiny_config(tmp_path, name="two", epochs=2)
    train_module.train(cfg, show_progress=False)
    last = os.path.join(run_dir(cfg), "last.pt")
    config_before = (Path(run_dir(cfg)) / "config.yaml").read_text()
    capfd.readouterr()
    assert train_module.main(["--resume", last, "--no-progress", "train.epochs=1"]) == 2
    assert "config key 'train.epochs' = 1, but the checkpoint has trained 2 epochs; give at least 2" in (
        capfd.readouterr().err)
    assert (Path(run_dir(cfg)) / "config.yaml").read_text() == config_before
    assert train_module.main(["--resume", last, "--no-progress"]) == 0  # the finished run: nothing to do


def test_a_failed_checkpoint_write_is_named_and_keeps_the_previous_file(tmp_path, monkeypatch):
    import utils.checkpoint

    cfg = tiny_config(tmp_path, name="full", epochs=2)
    train_module.train(cfg, show_progress=False)
    last = Path(run_dir(cfg)) / "last.pt"
    before = last.read_bytes()

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 494080 vs 493968") \
            from OSError(28, "No space left on device")

    monkeypatch.setattr(utils.checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError,
                       match=r"cannot write checkpoint .*last\.pt: No space left on device; the previous last\.pt"):
        utils.checkpoint.atomic_save({"x": 1}, last)
    assert last.read_bytes() == before and not list(last.parent.glob(".last.pt.*.tmp"))


def test_a_second_sigterm_keeps_saving_and_a_second_ctrl_c_stops_at_once_with_a_message(tmp_path, monkeypatch,
                                                                                         capfd):
    stop = train_module.StopRequest()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)  # a scheduler repeating its request: still a stop at the step's end
    assert stop() and stop.signal_name == "SIGTERM"
    with pytest.raises(train_module.SecondInterrupt):
        stop._handle(signal.SIGINT, None)

    def second_ctrl_c(*args, **kwargs):
        raise train_module.SecondInterrupt

    monkeypatch.setattr(train_module, "train", second_ctrl_c)
    capfd.readouterr()
    assert train_module.main(["--config", str(REPO / "configs" / "demo.yaml")]) == 130  # was a traceback
    assert "stopped at once by a second Ctrl-C, without saving" in capfd.readouterr().err

    def ctrl_c_while_loading_data(*args, **kwargs):  # before the stop handler is installed: a first Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.undo()  # the real train(), up to the data
    monkeypatch.setattr(train_module, "build_datasets", ctrl_c_while_loading_data)
    assert train_module.main(["--config", str(REPO / "configs" / "demo.yaml"), "--no-progress",
                              f"run.output_dir={tmp_path}"]) == 130
    err = capfd.readouterr().err
    assert "stopped by Ctrl-C while the run was starting or closing" in err and "second" not in err


def test_a_train_split_without_boxes_stops_and_shared_images_are_warned_about(tmp_path, monkeypatch):
    real_build = train_module.build_datasets

    def no_train_boxes(cfg):  # e.g. every class misspelt, with data.ignore_unknown_classes: true
        train_dataset, test_dataset = real_build(cfg)
        for record in train_dataset.records:
            record.boxes, record.labels, record.difficult = record.boxes[:0], record.labels[:0], record.difficult[:0]
        return train_dataset, test_dataset

    monkeypatch.setattr(train_module, "build_datasets", no_train_boxes)
    with pytest.raises(DataError, match=r"the train split has no box to train on \(12 images, difficult boxes left"):
        train_module.train(tiny_config(tmp_path, name="empty", epochs=1), show_progress=False)

    def test_on_training_images(cfg):
        train_dataset, test_dataset = real_build(cfg)
        test_dataset.records[:2] = train_dataset.records[:2]
        return train_dataset, test_dataset

    warnings = []
    monkeypatch.setattr(train_module, "build_datasets", test_on_training_images)
    monkeypatch.setattr(train_module.logger, "warning", lambda message, *args: warnings.append(message % args))
    train_module.train(tiny_config(tmp_path, name="shared", epochs=1), show_progress=False)
    assert any("2 of the 6 test images are also training images" in w for w in warnings)


def test_resuming_best_pt_in_place_does_not_overwrite_a_further_last_pt(tmp_path, capfd):
    cfg = tiny_config(tmp_path, name="run", epochs=1)
    train_module.train(cfg, show_progress=False)
    folder = Path(run_dir(cfg))
    epoch_1 = (folder / "last.pt").read_bytes()
    assert train_module.main(["--resume", str(folder / "last.pt"), "--no-progress", "train.epochs=2"]) == 0
    (folder / "best.pt").write_bytes(epoch_1)  # a best.pt from epoch 1, as when epoch 2 scored lower
    before = (folder / "last.pt").read_bytes()
    capfd.readouterr()
    assert train_module.main(["--resume", str(folder / "best.pt"), "--no-progress", "train.epochs=3"]) == 2
    assert "(step 3) in its folder would overwrite" in capfd.readouterr().err
    assert (folder / "last.pt").read_bytes() == before
    # From best.pt in a new folder it may go on.
    assert train_module.main(["--resume", str(folder / "best.pt"), "--no-progress", "train.epochs=3",
                              "run.name=from_best"]) == 0


def test_an_error_from_a_loader_worker_is_printed_as_its_own_message():
    import sys as system

    from torch._utils import ExceptionWrapper

    from data.errors import ImageReadError
    from utils.errors import user_message

    try:
        raise ImageReadError("/data/raccoon-39.jpg: decoded size 250x172 differs from the annotated size 500x344")
    except ImageReadError:
        wrapped = ExceptionWrapper(system.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(ImageReadError) as error:
        wrapped.reraise()
    assert "Original Traceback" in str(error.value)  # what torch gives the main process
    assert user_message(error.value) == (
        "/data/raccoon-39.jpg: decoded size 250x172 differs from the annotated size 500x344")
    assert user_message(ImageReadError("plain")) == "plain"


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_before_training(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    cfg = tiny_config(tmp_path, name="nocxx")
    cfg.train.compile = True
    with pytest.raises(ConfigError, match=r"'train.compile': torch.compile on CPU needs a working C\+\+ compiler "
                                          r"\(.*no-such-g\+\+.*\); install one .* or set train.compile=false"):
        train_module.train(cfg, show_progress=False)
    assert not (tmp_path / "runs" / "nocxx").exists()


def test_checkpoints_list_their_splits_and_a_resume_or_eval_on_other_data_is_warned_about(tmp_path, capfd):
    cfg = tiny_config(tmp_path, name="splits", epochs=1)
    train_module.train(cfg, show_progress=False)
    last = os.path.join(run_dir(cfg), "last.pt")
    checkpoint = load_checkpoint(last)
    main = tmp_path / "shapes" / "VOCdevkit" / "SHAPES" / "ImageSets" / "Main"
    trainval, test = (main / "trainval.txt").read_text().split(), (main / "test.txt").read_text().split()
    saved = checkpoint["data_ids"]
    assert (split_id_list(saved, "train"), split_id_list(saved, "test")) == (trainval, test)
    assert len(saved["train_images"]) == len(trainval) and len(saved["trained_earlier"]) == 0

    # The first training image moved into the test split by hand, as when files are renamed or re-split.
    (main / "trainval.txt").write_text("\n".join(trainval[1:]) + "\n")
    (main / "test.txt").write_text("\n".join([*test, trainval[0]]) + "\n")
    capfd.readouterr()
    train_module.train(tiny_config(tmp_path, name="splits", epochs=2), resume=last, show_progress=False)
    err = capfd.readouterr().err
    assert (f"the training split has 1 fewer (first: {trainval[0]}) than the checkpoint lists; the test split has "
            f"1 image(s) more (first: {trainval[0]}) than the checkpoint lists") in err
    moved = str(tmp_path / "shapes" / "VOCdevkit" / "SHAPES" / "JPEGImages" / f"{trainval[0]}.jpg")
    assert f"1 of the 7 test images were training images of this run before the resume (first: {moved})" in err
    assert len(load_checkpoint(last)["data_ids"]["trained_earlier"]) == 1  # still known as trained on
    assert eval_module.main(["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint", last, "--no-coco",
                             *tiny_overrides(tmp_path, name="splits")]) == 0
    err = capfd.readouterr().err
    assert f"1 of the 7 test images were training images of {last} (first: {moved})" in err
    assert "the test split has" not in err  # the resumed run's checkpoint lists the test split as it is now
    (main / "test.txt").write_text("\n".join(test[1:]) + "\n")  # evaluated on other data than the run's
    assert eval_module.main(["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint", last, "--no-coco",
                             *tiny_overrides(tmp_path, name="splits")]) == 0
    assert (f"the test split has 2 fewer (first: {test[0]}) than the checkpoint lists: these metrics are not "
            "comparable with those of the run") in capfd.readouterr().err


def test_a_failed_evaluation_keeps_the_trained_epoch_and_the_resume_evaluates_it(tmp_path, monkeypatch, capfd):
    cfg = tiny_config(tmp_path, name="evalfail", epochs=2)
    real_inference, calls = train_module.run_inference, {"n": 0}

    def failing_second_time(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise DataError("test image 000013.jpg: cannot read it")
        return real_inference(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_inference", failing_second_time)
    with pytest.raises(DataError, match="000013.jpg"):
        train_module.train(cfg, show_progress=False)
    last = os.path.join(run_dir(cfg), "last.pt")
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (1, 3, 6)
    assert "epoch 2's evaluation failed (DataError: test image 000013.jpg: cannot read it); last.pt holds the " \
           "trained epoch" in capfd.readouterr().err
    monkeypatch.setattr(train_module, "run_inference", real_inference)
    summary = train_module.train(tiny_config(tmp_path, name="evalfail", epochs=2), resume=last, show_progress=False)
    assert summary["global_step"] == 6 and summary["last_voc07_map"] is not None
    assert state_dicts_equal(load_checkpoint(last)["model"], uninterrupted_weights(tmp_path))


def test_a_batch_that_cannot_be_loaded_keeps_the_steps_before_it_and_the_resume_is_exact(tmp_path, monkeypatch,
                                                                                          capfd):
    cfg = tiny_config(tmp_path, name="loadfail", epochs=2)
    real_getitem, calls = SeededSamples.__getitem__, {"n": 0}

    def failing_19th_image(self, item):
        calls["n"] += 1
        if calls["n"] == 19:  # epoch 2's second batch (4 images a batch, 12 an epoch)
            raise ImageReadError("raccoon-17.jpg: decoded size 720x540 differs from the annotated size 360x540")
        return real_getitem(self, item)

    monkeypatch.setattr(SeededSamples, "__getitem__", failing_19th_image)
    with pytest.raises(ImageReadError, match="raccoon-17.jpg"):
        train_module.train(cfg, show_progress=False)
    last = os.path.join(run_dir(cfg), "last.pt")
    checkpoint = load_checkpoint(last)
    assert (checkpoint["epoch"], checkpoint["batches_done"], checkpoint["global_step"]) == (1, 1, 4)
    assert "the batch after step 4 could not be loaded (ImageReadError: raccoon-17.jpg: decoded size" in \
        capfd.readouterr().err
    monkeypatch.setattr(SeededSamples, "__getitem__", real_getitem)
    summary = train_module.train(tiny_config(tmp_path, name="loadfail", epochs=2), resume=last, show_progress=False)
    assert summary["global_step"] == 6
    assert state_dicts_equal(load_checkpoint(last)["model"], uninterrupted_weights(tmp_path))


def test_summary_names_the_run_folder_absolutely_when_run_output_dir_is_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, name="relative", epochs=1)
    cfg.run.output_dir = "runs"  # relative to the working folder, as after a resume it is not
    summary = train_module.train(cfg, show_progress=False)
    assert summary["run_dir"] == str(tmp_path / "runs" / "relative")


def test_an_older_checkpoint_on_a_random_split_is_warned_about(tmp_path, capfd):
    root = REPO / "tests" / "fixtures" / "raccoon"
    overrides = [f"data.root={root}", "data.train_split_file=null", "data.test_split_file=null",
                 "data.test_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}", f"run.output_dir={tmp_path}",
                 "run.name=older", "train.epochs=1", "train.batch_size=2", "model.width_mult=0.0625",
                 "model.image_size=64", "train.amp=fp32", "eval.coco_metrics=false"]
    cfg = load_config(REPO / "configs" / "custom.yaml", overrides)
    train_module.train(cfg, show_progress=False)
    last = tmp_path / "older" / "last.pt"
    checkpoint = load_checkpoint(last)
    del checkpoint["data_ids"]  # as written before checkpoints listed their splits
    torch.save(checkpoint, last)
    capfd.readouterr()
    assert eval_module.main(["--config", str(REPO / "configs" / "custom.yaml"), "--checkpoint", str(last),
                             "--no-coco", *overrides]) == 0
    assert "its run did not list its splits from the start" in capfd.readouterr().err
    assert train_module.main(["--resume", str(last), "--no-progress", "train.epochs=2"]) == 0
    assert "its run did not list its splits from the start" in capfd.readouterr().err
    # The resumed run's checkpoints list their splits, but not what the run trained on before: still said.
    assert eval_module.main(["--config", str(REPO / "configs" / "custom.yaml"), "--checkpoint", str(last),
                             "--no-coco", *overrides]) == 0
    assert "its run did not list its splits from the start" in capfd.readouterr().err
