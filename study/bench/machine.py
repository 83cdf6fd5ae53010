"""What a benchmark ran on: device, torch and Python versions, threads, and the device's FP32 peak.

The peak turns measured FLOP/s into a share of what the device could do: on
a CPU derived from /proc/cpuinfo (an assumption, not a measurement), on a GPU
taken from its datasheet.
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch

from cnnlib.training import LoopOptions

# FP32 (non-tensor-core) peaks from NVIDIA's datasheets, by a substring of the device name.
GPU_FP32_PEAKS = (
    ("H200 NVL", 60e12, "NVIDIA H200 datasheet: FP32 60 TFLOPS (H200 NVL)"),
    ("H200", 67e12, "NVIDIA H200 datasheet: FP32 67 TFLOPS (H200 SXM)"),
    ("H100 PCIe", 51e12, "NVIDIA H100 datasheet: FP32 51 TFLOPS (H100 PCIe)"),
    ("H100", 67e12, "NVIDIA H100 datasheet: FP32 67 TFLOPS (H100 SXM)"),
    ("A100", 19.5e12, "NVIDIA A100 datasheet: FP32 19.5 TFLOPS"),
)


def _cpuinfo() -> list[dict[str, str]]:
    """One dict per logical CPU from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    cpus = []
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        cpus.append(fields)
    return cpus


def cpu_peak() -> dict:
    """FP32 peak of the whole CPU: cores x clock x FLOPs per cycle per core, read from /proc/cpuinfo.

    FLOPs per cycle assume two FMA pipes per core (Zen 2+, Haswell+ and server
    Skylake+): AVX-512 2 x 16 lanes x 2 = 64, AVX2+FMA 2 x 8 x 2 = 32, SSE 8.
    The clock is the one /proc/cpuinfo reports (nominal under a hypervisor);
    boost clocks would raise the peak.
    """
    cpus = _cpuinfo()
    if not cpus:
        return {"flops": None, "source": "no /proc/cpuinfo: peak unknown"}
    flags = set(cpus[0].get("flags", "").split())
    cores = len({(c.get("physical id"), c.get("core id")) for c in cpus}) if "core id" in cpus[0] else len(cpus)
    mhz = max(float(c.get("cpu MHz", "nan")) for c in cpus)
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512 (2 FMA x 16 FP32 lanes x 2)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA (2 FMA x 8 FP32 lanes x 2)"
    else:
        per_cycle, isa = 8, "SSE (4 lanes x 2 ops)"
    flops = cores * mhz * 1e6 * per_cycle if math.isfinite(mhz) else None
    return {"flops": flops, "cores": cores, "mhz": mhz, "flops_per_cycle_per_core": per_cycle,
            "source": f"derived from /proc/cpuinfo: {cores} cores x {mhz:.0f} MHz x {per_cycle} FLOP/cycle "
                      f"({isa}); an assumption, not a measurement"}


def gpu_peak(name: str) -> dict:
    for key, flops, source in GPU_FP32_PEAKS:
        if key.lower() in name.lower():
            return {"flops": flops, "source": source}
    return {"flops": None, "source": f"no datasheet FP32 figure on file for {name!r}"}


def device_facts(device: torch.device) -> dict:
    facts = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "python": platform.python_version(), "channels_last": LoopOptions().channels_last}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        facts.update(device_name=name, cuda=torch.version.cuda, peak=gpu_peak(name))
    else:
        cpus = _cpuinfo()
        facts.update(device_name=cpus[0].get("model name", platform.processor()) if cpus else platform.processor(),
                     cpu_capability=torch.backends.cpu.get_cpu_capability(), peak=cpu_peak())
    return facts
