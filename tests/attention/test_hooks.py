import pytest
import torch

from atcache.errors import AtcacheError
from atcache.attention.hooks import FeatureHooks, probe_layers
from atcache.yolo import load_model

LAYERS = (6, 8, 13, 16, 19, 22)


@pytest.mark.parametrize(
    "name,channels",
    [("yolo11n.yaml", (128, 256, 128, 64, 128, 256)), ("yolo11s.yaml", (256, 512, 256, 128, 256, 512))],
)
def test_hooks_capture_expected_shapes(name, channels):
    teacher = load_model(name, nc=20)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), FeatureHooks(teacher.model, LAYERS) as hooks:
        feats = hooks.run(teacher.model, x)
    strides = (16, 32, 16, 8, 16, 32)
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]


def test_early_stop_gives_the_same_maps_as_full_forward():
    model = load_model("yolo11n.yaml", nc=20).model
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), FeatureHooks(model, LAYERS) as full:
        a = full.run(model, x)
    with torch.no_grad(), FeatureHooks(model, LAYERS, stop_after_last=True) as cut:
        b = cut.run(model, x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not model.model[6]._forward_hooks  # removed on exit


def test_bad_layers():
    model = load_model("yolo11n.yaml", nc=20).model
    with pytest.raises(AtcacheError, match="layer 40 does not exist.*0..23"):
        probe_layers(model, (6, 40), 64, torch.device("cpu"))
    with pytest.raises(AtcacheError, match="layer 23 outputs"):
        probe_layers(model, (23,), 64, torch.device("cpu"))


def test_yaml_teacher_is_reproducible_and_missing_teacher_is_clear(tmp_path):
    assert load_model("yolo11n.yaml").weights_sha256 == load_model("yolo11n.yaml").weights_sha256
    with pytest.raises(AtcacheError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(AtcacheError, match="neither a checkpoint"):
        load_model(tmp_path / "teacher.onnx")
