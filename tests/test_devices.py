"""The default device '' means auto everywhere: CUDA device 0 when torch sees CUDA, else the CPU."""

import pytest
import torch

from atcache.devices import cuda_fallback, cuda_indices, parse_devices, ranks_on_this_node, resolve_device


@pytest.fixture
def cuda(monkeypatch):
    def set_cuda(available: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if available else 0)
    return set_cuda


def test_auto_is_cuda_0_with_cuda(cuda, monkeypatch):
    cuda(True)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for auto in ("", None, " "):
        assert parse_devices(auto) == ["0"]
        assert resolve_device(auto) == torch.device("cuda:0")
        assert cuda_fallback(auto) == "0"
    assert cuda_indices("") == ["0"]
    assert ranks_on_this_node("") == 1
    assert cuda_fallback("0") == "0"


def test_auto_is_cpu_without_cuda(cuda, monkeypatch):
    cuda(False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for auto in ("", None, " "):
        assert parse_devices(auto) == ["cpu"]
        assert resolve_device(auto) == torch.device("cpu")
        assert cuda_fallback(auto) == "cpu"
    assert cuda_indices("") == []
    assert ranks_on_this_node("") == 1
    assert cuda_fallback("0") == "cpu"


def test_explicit_devices_are_kept(cuda):
    cuda(False)
    assert parse_devices("0,1") == ["0", "1"]
    assert parse_devices("cuda:1") == ["1"]
    assert parse_devices("cpu") == ["cpu"]
    assert resolve_device("cpu") == torch.device("cpu")
    assert cuda_fallback("1") == "1"
