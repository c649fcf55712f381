"""Device strings, parsed in one place: `--device cpu | 0 | cuda:1 | 0,1,2,3` for builds, training and bench."""

from __future__ import annotations

import os


def parse_devices(text: str | None) -> list[str]:
    """'0,1' -> ['0', '1']; 'cuda:1' -> ['1']; 'cpu' -> ['cpu']; '' or None -> []."""
    out = []
    for d in str(text or "").split(","):
        d = d.strip().lower()
        if d.startswith("cuda:"):
            d = d[len("cuda:"):]
        if d:
            out.append(d)
    return out


def cuda_indices(text: str | None) -> list[str]:
    """The CUDA indices a device string lists, or [] when it is not a list of CUDA indices (cpu, mps, auto)."""
    devices = parse_devices(text)
    return devices if devices and all(d.isdigit() for d in devices) else []


def ranks_on_this_node(device: str | None = None) -> int:
    """Training processes on this machine, each holding its own copy of an in-RAM cache: torchrun's LOCAL_WORLD_SIZE
    inside a DDP rank, else the CUDA devices listed in --device (ultralytics starts one process per device)."""
    if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    return max(1, len(cuda_indices(device)))


def cuda_fallback(device: str) -> str:
    """The CLI's default device '0' becomes 'cpu' on a machine without CUDA (the caller says so)."""
    import torch

    return "cpu" if device == "0" and not torch.cuda.is_available() else device


def resolve_device(device: str):
    """'cpu', '0', 'cuda:1' -> a torch.device; a clear error if that GPU is not there."""
    import torch

    from atcache.errors import AtcacheError

    d = str(device).strip().lower()
    if d in ("cpu", ""):
        return torch.device("cpu")
    if d == "mps":
        return torch.device("mps")
    index = d.split(":", 1)[1] if d.startswith("cuda") and ":" in d else ("0" if d == "cuda" else d)
    if not index.isdigit():
        raise AtcacheError(f"--device {device!r} is not understood; use cpu, 0, 1, ... (one device per build process)")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise AtcacheError(f"--device {device}: CUDA device {index} is not available ({n} GPU(s) visible); use --device cpu")
    return torch.device(f"cuda:{index}")
