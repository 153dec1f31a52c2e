"""Model FLOPs, device peaks and model FLOPs utilisation (MFU).

    flops = model_flops_per_step(cfg, params_shape)       # PaLM count, one training step
    peak = peak_flops_per_device(jax.devices()[0], "bfloat16")   # None where seismo knows none
    mfu = flops / step_time_s / (n_devices * peak)

MFU is the definition of PaLM (Chowdhery et al. 2022, arXiv 2204.02311, Appendix B): the
model FLOPs a step needs (forward and backward, no rematerialisation counted: recomputed work
is not useful work) divided by what the devices could do at their peak rate in the time the step
took. The model FLOPs per token are 6 N for the N parameters of matrix multiplies (embedding
lookups excluded, the output head included; 2 per multiply-add, times 3 for the forward pass
and the two matmuls of its backward pass) plus 12 L H Q T for attention (L layers, H heads of
size Q, context T: the score and value matmuls, forward and backward).

Peaks are the published dense (no structured sparsity) tensor rates per jax device, by compute
dtype (`model.dtype`), from Google Cloud's TPU system-architecture pages and NVIDIA's data
sheets. float32 compute runs its matmuls at the default precision: on TPUs one bfloat16 pass
(the bfloat16 peak), on NVIDIA GPUs from Ampere on TF32 tensor cores (the TF32 peak). A device
that is not in the table (a CPU, a GPU not listed) has no peak: `run.peak_flops` gives one.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax

from seismo import models
from seismo.config import Config


def model_flops_per_step(cfg: Config, params_shape: Any) -> float:
    """Training FLOPs of one step of one run by the PaLM count (Chowdhery et al. 2022, arXiv
    2204.02311, appendix B): 6 N per token for the N parameters of matrix multiplies (embedding
    lookups excluded, the head included) plus 12 L H Q T per token for attention."""
    m = cfg.model
    groups = models.param_groups(params_shape)
    n = sum(math.prod(p.shape) for p, g in zip(jax.tree.leaves(params_shape), jax.tree.leaves(groups))
            if g == "kernel")
    if m.tie_embeddings:
        n += m.vocab_size * m.d_model
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return float(6 * n * tokens + 12 * m.n_layers * m.n_heads * m.resolved_head_dim * cfg.data.seq_len * tokens)


@dataclasses.dataclass(frozen=True)
class Peak:
    """Dense peak FLOP/s of one chip, by compute dtype, and how many jax devices one chip is."""

    pattern: str  # regex matched against jax's Device.device_kind
    bfloat16: float
    float32: float
    devices_per_chip: int = 1
    source: str = ""


# Per chip. TPU: cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-generation
# pages (bf16; float32 matmuls run as one bf16 pass at the default precision). v2 and v3 chips
# are two jax devices (one per TensorCore), v4 and v5p one (megacore), tpu7x two.
# GPU: NVIDIA data sheets, dense tensor-core rates (bf16; float32 as TF32).
PEAKS: tuple[Peak, ...] = (
    Peak(r"^TPU v2", 45e12, 45e12, 2, "Cloud TPU v2"),
    Peak(r"^TPU v3", 123e12, 123e12, 2, "Cloud TPU v3"),
    Peak(r"^TPU v4", 275e12, 275e12, 1, "Cloud TPU v4"),
    Peak(r"^TPU v5 lite", 197e12, 197e12, 1, "Cloud TPU v5e"),
    Peak(r"^TPU v5(p)?$", 459e12, 459e12, 1, "Cloud TPU v5p"),
    Peak(r"^TPU v6 lite", 918e12, 918e12, 1, "Cloud TPU v6e (Trillium)"),
    Peak(r"^TPU7x", 2307e12, 2307e12, 2, "Cloud TPU7x (Ironwood)"),
    Peak(r"H100.*PCIe", 756e12, 378e12, 1, "NVIDIA H100 PCIe"),
    Peak(r"H100", 989e12, 494.7e12, 1, "NVIDIA H100 SXM"),
    Peak(r"H200", 989e12, 494.7e12, 1, "NVIDIA H200 SXM"),
    Peak(r"A100", 312e12, 156e12, 1, "NVIDIA A100"),
    Peak(r"\bL4\b", 121e12, 60e12, 1, "NVIDIA L4"),
    Peak(r"\bA10G?\b", 125e12, 62.5e12, 1, "NVIDIA A10 / A10G"),
)


def chip_peak(device_kind: str) -> Peak | None:
    """The table's entry for a jax device kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), or None."""
    for p in PEAKS:
        if re.search(p.pattern, device_kind):
            return p
    return None


def peak_flops_per_device(device: Any, dtype: str = "bfloat16", override: float | None = None,
                          devices_per_chip: int | None = None) -> float | None:
    """Peak FLOP/s of one jax device computing in `dtype` ('float32' or 'bfloat16'):
    `override` (run.peak_flops) when given, else the table's figure for the device's kind
    divided among the devices of one chip (`devices_per_chip`, default the table's: what Cloud
    TPU VMs run); None when the device is not in the table."""
    if override is not None:
        return float(override)
    p = chip_peak(getattr(device, "device_kind", ""))
    if p is None:
        return None
    return (p.float32 if dtype == "float32" else p.bfloat16) / (devices_per_chip or p.devices_per_chip)


def mfu(model_flops_per_step: float, step_time_s: float | None, n_devices: int, peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak; None when the
    peak or the time is unknown."""
    if not peak_per_device or not step_time_s or step_time_s <= 0:
        return None
    return model_flops_per_step / step_time_s / (n_devices * peak_per_device)
