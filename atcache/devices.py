"""Device strings, parsed in one place: `--device cpu | 0 | cuda:1 | 0,1,2,3` for builds, training and bench. The
default '' means auto everywhere (CLI and direct library calls alike): CUDA device 0 when there is one, else the CPU."""

from __future__ import annotations

import os


def auto_device() -> str:
    """What the default device '' stands for: '0' (CUDA device 0) when torch sees CUDA, else 'cpu'."""
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def parse_devices(text: str | None) -> list[str]:
    """'0,1' -> ['0', '1']; 'cuda:1' -> ['1']; 'cpu' -> ['cpu']; '' or None (auto) -> ['0'] with CUDA, else ['cpu']."""
    if not str(text or "").strip():
        return [auto_device()]
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


def check_devices(text: str) -> None:
    """Every device `text` lists exists here (cpu, mps, or a CUDA index below the count torch sees); else one line
    naming the devices that do."""
    import torch

    from atcache.errors import AtcacheError

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d in parse_devices(text):
        if d in ("cpu", "mps"):
            continue
        if not d.isdigit():
            raise AtcacheError(f"--device {text!r} is not understood; use cpu, a CUDA index (0) or several (0,1)")
        if int(d) >= count:
            if not count:
                raise AtcacheError(f"--device {text}: there is no CUDA device {d} (torch sees no CUDA device on this "
                                   "machine); use --device cpu, or check CUDA_VISIBLE_DEVICES and the driver")
            there = ", ".join(f"{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
            raise AtcacheError(f"--device {text}: there is no CUDA device {d} (CUDA devices here: {there}); pick "
                               "among them or use --device cpu")


def cuda_fallback(device: str) -> str:
    """The default device '' (auto) becomes CUDA device '0' when there is one, else 'cpu'; an explicit '0' becomes
    'cpu' on a machine without CUDA too (the caller says so); any other device is kept."""
    import torch

    if not str(device or "").strip():
        return auto_device()
    return "cpu" if device == "0" and not torch.cuda.is_available() else device


def resolve_device(device: str):
    """'cpu', '0', 'cuda:1' -> a torch.device ('' (auto): CUDA device 0 when there is one, else the CPU); a clear
    error if that GPU is not there."""
    import torch

    from atcache.errors import AtcacheError

    d = str(device or "").strip().lower() or auto_device()
    if d == "cpu":
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
