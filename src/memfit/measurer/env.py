"""Where a measurement ran: GPU, driver, CUDA and library versions. No hostname, no user names.

:func:`software_versions` and :func:`nvidia_smi` import no torch and create no CUDA context, so a parent
process (``validation/run_records.py``) can call them without taking GPU memory from the runs it starts.
"""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

__all__ = ["software_versions", "nvidia_smi", "environment"]

_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "flash-attn", "nvidia-ml-py")


def software_versions() -> dict[str, Any]:
    from importlib import metadata

    from .. import __version__

    out: dict[str, Any] = {"python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}",
                           "memfit": __version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")
    out["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    return out


def nvidia_smi() -> dict[str, Any]:
    """GPU names, memory and driver from ``nvidia-smi`` ({} where it is missing)."""
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return {}
    if res.returncode != 0:
        return {}
    gpus = []
    for line in res.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mib = int(parts[2]) if parts[2].isdigit() else None
            gpus.append({"name": parts[0], "driver": parts[1], "memory_total_bytes": mib * 2**20 if mib else None})
    if not gpus:
        return {}
    return {"gpu_count": len(gpus), "gpu_name": gpus[0]["name"], "driver": gpus[0]["driver"],
            "gpu_memory_total_bytes": gpus[0]["memory_total_bytes"]}


def environment(device: Any = None) -> dict[str, Any]:
    """Everything above plus, when ``device`` is a CUDA device, what torch reports of it."""
    env = software_versions()
    try:
        import torch
    except ImportError:
        return env
    env["torch_cuda"] = torch.version.cuda
    env["torch_git"] = getattr(torch.version, "git_version", None)
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        env["gpu_name"] = props.name
        env["gpu_memory_total_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        from .meters import Nvml

        driver = Nvml(dev).driver_version()
        if driver is None:
            driver = nvidia_smi().get("driver")
        env["driver"] = driver
    else:
        env["device"] = str(dev) if dev is not None else "cpu"
        env["cpu"] = platform.processor() or platform.machine()
    return env
