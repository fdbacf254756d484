"""TinyDetector: shapes, head order vs priors, precision modes, and VGG16 weight loading."""

import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

import model.vgg as vgg
from model.detector import ModelConfigError, TinyDetector
from model.loss import MultiBoxLoss
from model.priors import create_prior_boxes
from model.vgg import WeightsError, build_vgg16_features, vgg16_channels
from utils.builders import build_model
from utils.config import load_config
from utils.postprocess import detect_objects

BOXES = [torch.tensor([[0.1, 0.2, 0.5, 0.7]]), torch.tensor([[0.3, 0.3, 0.9, 0.8], [0.0, 0.0, 0.2, 0.3]])]
LABELS = [torch.tensor([3]), torch.tensor([1, 20])]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return TinyDetector(21, width_mult=0.125)


def test_forward_backward_batch_2(small_model):
    images = torch.randn(2, 3, 224, 224)
    locs, scores = small_model(images)
    assert locs.shape == (2, 441, 4) and scores.shape == (2, 441, 21)
    out = MultiBoxLoss(small_model.priors_cxcywh)(locs, scores, BOXES, LABELS)
    small_model.zero_grad()
    out.total.backward()
    assert torch.isfinite(out.total)
    grads = [p.grad for p in small_model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert small_model.base[0].weight.grad.abs().sum() > 0
    dets = small_model.detect_objects(locs.detach(), scores.detach())
    assert len(dets) == 2 and all(d.boxes.shape[0] <= 200 for d in dets)


def test_full_width_shapes():
    model = TinyDetector(21).eval()
    assert model.base[28].out_channels == 512
    with torch.no_grad():
        locs, scores = model(torch.randn(1, 3, 224, 224))
    assert locs.shape == (1, 441, 4) and scores.shape == (1, 441, 21)


def test_width_multiplier_channels():
    assert vgg16_channels(0.25) == [16, 32, 64, 128, 128]
    assert vgg16_channels(1.0) == [64, 128, 256, 512, 512]
    convs = [m.out_channels for m in build_vgg16_features(0.25) if isinstance(m, nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_layout_matches_torchvision(batch_norm):
    ours = build_vgg16_features(1.0, batch_norm)
    theirs = make_layers(cfgs["D"], batch_norm=batch_norm)
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}


def test_head_order_matches_priors():
    # Channel 0 of the feature map holds the cell index (row * 7 + col); the heads keep only a centre tap
    # from channel 0 and a bias of 100 x the output channel. Prior p must then read cell p // 9 and
    # head channel slot * 4 + j (slot * C + j for the scores), slot = p % 9.
    model = TinyDetector(3, width_mult=0.125)
    features = torch.zeros(1, model.loc_head.in_channels, 7, 7)
    features[0, 0] = torch.arange(49, dtype=torch.float32).view(7, 7)
    with torch.no_grad():
        for head in (model.loc_head, model.cls_head):
            head.weight.zero_()
            head.weight[:, 0, 1, 1] = 1.0
            head.bias.copy_(torch.arange(head.out_channels, dtype=torch.float32) * 100)
        locs, scores = model.predict(features)
    p = torch.arange(441)
    cell, slot = (p // 9).float(), p % 9
    assert torch.equal(locs[0], cell[:, None] + (slot[:, None] * 4 + torch.arange(4)) * 100)
    assert torch.equal(scores[0], cell[:, None] + (slot[:, None] * 3 + torch.arange(3)) * 100)
    # the priors of prior p's cell sit at that cell's centre
    priors = model.priors_cxcywh
    assert torch.allclose(priors[:, 0], ((cell % 7) + 0.5) / 7)
    assert torch.allclose(priors[:, 1], ((cell // 7) + 0.5) / 7)
    assert torch.equal(priors, create_prior_boxes())


def test_channels_last_and_bf16_autocast(small_model):
    images = torch.randn(1, 3, 224, 224)
    small_model.eval()
    with torch.no_grad():
        locs, scores = small_model(images)
        cl_model = TinyDetector(21, width_mult=0.125)
        cl_model.load_state_dict(small_model.state_dict())
        cl_model = cl_model.eval().to(memory_format=torch.channels_last)
        cl_locs, cl_scores = cl_model(images.to(memory_format=torch.channels_last))
    small_model.train()
    assert torch.allclose(cl_locs, locs, atol=1e-4) and torch.allclose(cl_scores, scores, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf_locs, bf_scores = small_model(images)
        out = MultiBoxLoss(small_model.priors_cxcywh)(bf_locs, bf_scores, BOXES[:1], LABELS[:1])
    assert bf_locs.dtype == torch.bfloat16
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in small_model.parameters())


def test_batch_norm_variant_runs():
    model = TinyDetector(5, width_mult=0.125, batch_norm=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.base)
    locs, scores = model(torch.randn(2, 3, 224, 224))
    assert locs.shape == (2, 441, 4) and scores.shape == (2, 441, 5)


def test_other_image_size_and_priors():
    model = TinyDetector(4, width_mult=0.125, image_size=96, scales=(0.3, 0.6), aspect_ratios=(1.0,))
    locs, scores = model(torch.randn(1, 3, 96, 96))
    assert model.n_priors == 3 * 3 * 2
    assert locs.shape == (1, 18, 4) and scores.shape == (1, 18, 4)


def test_head_prior_prob_init():
    model = TinyDetector(4, width_mult=0.125, head_prior_prob=0.01)
    bias = model.cls_head.bias.view(9, 4)
    assert torch.all(bias[:, 0] == 0)
    assert torch.allclose(torch.sigmoid(bias[:, 1:]), torch.full((9, 3), 0.01))
    assert torch.all(TinyDetector(4, width_mult=0.125).cls_head.bias == 0)


def test_bad_options_and_inputs(small_model):
    with pytest.raises(ModelConfigError, match="n_classes"):
        TinyDetector(1)
    with pytest.raises(ModelConfigError, match="width_mult=1.0, got width_mult=0.5"):
        TinyDetector(21, width_mult=0.5, pretrained=True)
    with pytest.raises(ModelConfigError, match=r"\(N, 3, 224, 224\)"):
        small_model(torch.zeros(1, 3, 200, 200))


def torchvision_state_dict(batch_norm):
    """A torchvision vgg16 / vgg16_bn state_dict (random init): ``features.*`` plus classifier keys."""
    torch.manual_seed(1)
    features = make_layers(cfgs["D"], batch_norm=batch_norm)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # real files have a classifier; it must be ignored
    return state


@pytest.mark.parametrize("batch_norm", [False, True])
def test_weights_path_loads_torchvision_state_dict(tmp_path, batch_norm):
    state = torchvision_state_dict(batch_norm)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = TinyDetector(21, batch_norm=batch_norm, weights_path=str(path))
    last_conv = "features.40.weight" if batch_norm else "features.28.weight"
    assert torch.equal(model.base[0].weight, state["features.0.weight"])
    assert torch.equal(model.base[int(last_conv.split(".")[1])].weight, state[last_conv])
    if batch_norm:
        assert torch.equal(model.base[1].running_var, state["features.1.running_var"])


def test_weights_path_loads_a_vgg16_bn_file_without_batch_counters(tmp_path):
    # torchvision's vgg16_bn-6c64b313.pth predates BatchNorm's num_batches_tracked buffers.
    state = {k: v for k, v in torchvision_state_dict(batch_norm=True).items() if "num_batches_tracked" not in k}
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    model = TinyDetector(21, batch_norm=True, weights_path=str(path))
    assert torch.equal(model.base[1].running_mean, state["features.1.running_mean"])
    assert torch.equal(model.base[40].weight, state["features.40.weight"])
    assert int(model.base[1].num_batches_tracked) == 0


def test_weights_path_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth: no such file"):
        TinyDetector(21, weights_path=missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: cannot read .*not a file written by torch.save"):
        TinyDetector(21, weights_path=garbage)
    whole_model = tmp_path / "model.pth"
    torch.save(nn.Conv2d(1, 1, 1), whole_model)  # a module pickled whole, not its state_dict
    with pytest.raises(WeightsError, match=r"model.pth: cannot read .*pickled Python objects.*state_dict\(\)") as info:
        TinyDetector(21, weights_path=whole_model)
    assert "\x1b" not in str(info.value) and "weights_only" not in str(info.value)
    not_tensors = tmp_path / "lists.pth"
    torch.save({"features.0.weight": [1.0]}, not_tensors)
    with pytest.raises(WeightsError, match="lists.pth: features.0.weight is a list, not a tensor"):
        TinyDetector(21, weights_path=not_tensors)
    bn_file = tmp_path / "vgg16_bn.pth"
    torch.save(torchvision_state_dict(batch_norm=True), bn_file)
    with pytest.raises(WeightsError, match=r"vgg16_bn.pth: does not fit the vgg16 \(batch_norm=False\)"):
        TinyDetector(21, weights_path=bn_file)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="other.pth: no 'features"):
        TinyDetector(21, weights_path=other)


def test_offline_download_says_how_to_pass_a_local_file(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(vgg, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        TinyDetector(21, pretrained=True)
    message = str(info.value)
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "model.weights_path=/path/to/vgg16-397923af.pth" in message


def test_pretrained_uses_downloaded_state_dict(monkeypatch):
    state = torchvision_state_dict(batch_norm=False)
    urls = []

    def fake_download(url, **kwargs):
        urls.append(url)
        return state

    monkeypatch.setattr(vgg, "load_state_dict_from_url", fake_download)
    model = TinyDetector(21, pretrained=True)
    assert urls == ["https://download.pytorch.org/models/vgg16-397923af.pth"]
    assert torch.equal(model.base[0].weight, state["features.0.weight"])


class _CodeInPickle:
    """Unpickling it would create a file: what a planted weights file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_cached_weights_file_is_loaded_without_running_its_code(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))  # the cache load_state_dict_from_url reads
    cached = hub / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"features.0.weight": _CodeInPickle(marker)}, cached)
    with pytest.raises(WeightsError, match=r"cannot read the cached ImageNet VGG16 weights .*vgg16-397923af\.pth"):
        TinyDetector(21, pretrained=True)
    assert not marker.exists()
    cached.write_bytes(b"truncated download")
    with pytest.raises(WeightsError, match=r"vgg16-397923af\.pth \(\w+: .*\); delete that file to download it again"):
        TinyDetector(21, pretrained=True)


@pytest.mark.parametrize(("classification", "activation"), [("hard_negative", "softmax"),
                                                             ("focal_softmax", "softmax"), ("focal_sigmoid", "sigmoid")])
def test_a_model_built_for_a_loss_reads_its_logits_as_that_loss_trained_them(classification, activation):
    cfg = load_config(None, ["model.width_mult=0.0625", "model.pretrained=false", "model.image_size=64",
                             f"loss.classification={classification}"])
    model = build_model(cfg.model, 3, cfg.loss.classification).eval()
    assert model.score_activation == activation
    torch.manual_seed(0)
    locs, scores = model(torch.randn(2, 3, 64, 64))
    default = model.detect_objects(locs, scores, min_score=0.001)
    explicit = detect_objects(locs, scores, model.priors_cxcywh, min_score=0.001, activation=activation)
    other = detect_objects(locs, scores, model.priors_cxcywh, min_score=0.001,
                           activation="sigmoid" if activation == "softmax" else "softmax")
    for got, want in zip(default, explicit, strict=True):
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.scores, want.scores)
    assert any(len(a.scores) != len(b.scores) or not torch.equal(a.scores, b.scores)
               for a, b in zip(default, other, strict=True))
    with pytest.raises(ModelConfigError, match="score_activation"):
        TinyDetector(3, width_mult=0.0625, image_size=64, score_activation="relu")
