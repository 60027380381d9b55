"""Throughput accounting: peak FLOP/s by device, model FLOPs utilisation (MFU) and peak memory.

MFU = achieved model FLOP/s / the device's peak FLOP/s (PaLM, Chowdhery et al. 2022, appendix B;
nanoGPT `estimate_mfu`). The achieved FLOP/s is `Transformer.flops_per_token(seq_len)` x training
tokens/s, where `flops_per_token` counts ACTIVE FLOPs only: a memory layer costs its query
network, its key scores and the value rows it actually reads (heads x knn rows per token), never
the whole value table. So a 12-layer model with a 268M-value memory is charged about what a dense
12-layer model is, plus the memory's small query/key work; that is the honest denominator for
"is the hardware busy", and it is why MFU of a memory model is lower than a dense one's: a
gather reads bytes without multiplying much.

`memory_layer_costs` breaks one memory layer's share down by part (the 2019 layer's, then each
registered variant's, `ProductKeyMemory.macs`): the same accounting as `flops_per_token`, whose 6 * N
rule it reproduces for the layer (`macs` = its active non-value parameters + the value rows read).

Needs torch only. Peaks are per GPU: divide the FLOP/s of a multi-GPU job by the number of GPUs.
"""

from __future__ import annotations

import re
import resource
import sys
from typing import Dict, Optional

import torch

__all__ = ["PEAK_TFLOPS", "memory_layer_costs", "mfu", "peak_flops", "peak_memory_bytes"]

# Dense (no structured sparsity) peak tensor throughput in TFLOP/s per GPU, from NVIDIA's
# datasheets: (bf16, tf32, fp32 without tensor cores). Datasheets quote "with sparsity" figures
# too; those are 2x the dense ones and never apply to this model. The first pattern found (as a
# whole word) in `torch.cuda.get_device_name()` wins, so the more specific names come first.
#   H100 SXM5 (reports "H100 80GB HBM3"): 989.4 / 494.7 / 66.9  (H100 Tensor Core GPU datasheet)
#   H100 PCIe: 756.5 / 378 / 51.2;  H100 NVL: 835.5 / 417.5 / 60 (H100 NVL datasheet, per GPU)
#   H200 (SXM): 989.4 / 494.7 / 66.9 (same compute as H100 SXM; H200 datasheet)
#   A100 (SXM4 and PCIe): 312 / 156 / 19.5 (A100 datasheet)
#   L40S: 362.05 / 183 / 91.6;  L4: 121 / 60 / 30.3;  A10: 125 / 62.5 / 31.2
# A device not listed (an A10G, an L40, a consumer card) gets no MFU (null) unless
# `train.peak_flops` gives its peak.
PEAK_TFLOPS = (
    (r"H100 PCIe", (756.5, 378.0, 51.2)),
    (r"H100 NVL", (835.5, 417.5, 60.0)),
    (r"H100", (989.4, 494.7, 66.9)),
    (r"H200", (989.4, 494.7, 66.9)),
    (r"A100", (312.0, 156.0, 19.5)),
    (r"L40S", (362.05, 183.0, 91.6)),
    (r"L4", (121.0, 60.0, 30.3)),
    (r"A10", (125.0, 62.5, 31.2)),
)


def peak_flops(
    device: torch.device, amp_dtype: Optional[torch.dtype], configured: Optional[float] = None
) -> Optional[float]:
    """Peak FLOP/s that MFU is measured against, or None when unknown.

    `configured` (`train.peak_flops`) wins. Otherwise, on CUDA: the table's entry for the device
    name at the precision the matmuls run in (bf16 autocast -> bf16; fp32 -> tf32 when
    `torch.backends.cuda.matmul.allow_tf32`, else plain fp32). On CPU: None (a CPU's peak depends
    on its cores, clocks and vector units; give `train.peak_flops` to get an MFU there).
    """
    if configured is not None:
        return float(configured)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _table_peak(
        torch.cuda.get_device_name(device), amp_dtype == torch.bfloat16, torch.backends.cuda.matmul.allow_tf32
    )


def _table_peak(name: str, bf16_autocast: bool, allow_tf32: bool) -> Optional[float]:
    """The table's peak FLOP/s for a CUDA device name, or None for a device it does not list."""
    for pattern, (bf16, tf32, fp32) in PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){pattern}(?![A-Za-z0-9])", name):
            if bf16_autocast:
                return bf16 * 1e12
            return (tf32 if allow_tf32 else fp32) * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1] (can exceed 1 only if `peak` is wrong); None if no peak."""
    if peak is None or peak <= 0:
        return None
    return flops_per_token * tokens_per_s / peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: on CUDA the most bytes tensors ever held on `device`
    (`torch.cuda.max_memory_allocated`; the caching allocator reserves somewhat more); elsewhere
    the process's peak resident set size (`getrusage` maxrss: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def memory_layer_costs(memory) -> Dict[str, int]:
    """Multiply-adds per token of one `ProductKeyMemory`, by part, and its parameters.

    query   D * H * Q           the query projection (norms and biases not counted)
    keys    H * S * Q           every sub-key of both halves scored (= the key parameter count)
    read    H * K * V           the weighted read of the selected value rows
    ...     each registered variant's parts (`MemoryVariant.macs`, 0 when its options are off),
            e.g. PEER's down H * K * D (x . u_i for the H*K slots read), Memory+'s gate
            D * V + V * D (gate_proj and out_proj)
    macs    their sum; training FLOPs per token = 6 * macs (forward 2 *, backward 4 *), as
            `Transformer.flops_per_token` counts the layer
    params  the layer's parameters, its value tables included when it owns them
    value_params  those in its value tables (0 for a layer reading a shared pool)
    active_params  params - value_params + the table parameters one token reads (`read_params`)
    Top-k selections, candidate sums, softmaxes and norms have no multiplies worth counting.
    """
    costs = memory.macs()
    costs["macs"] = sum(costs.values())
    tables = [t for t in (memory.values, memory.down) if t is not None]
    params = sum(p.numel() for p in memory.parameters())
    value_params = sum(t.weight.numel() for t in tables)
    costs.update(params=params, value_params=value_params, active_params=params - value_params + memory.read_params())
    return costs
