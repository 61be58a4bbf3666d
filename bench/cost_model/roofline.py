"""Roofline time of a list of recorded ops on a named GPU: eager execution, one kernel per op, each kernel
taking max(FLOPs / peak, bytes / bandwidth); then one efficiency factor for everything a roofline leaves out.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List

from .record import OpCost


@dataclass(frozen=True)
class Device:
    """A GPU's datasheet figures: dense tensor-core peaks (FLOP/s) and memory bandwidth (bytes/s)."""

    name: str
    peak_fp16: float  # fp16 and bf16, dense (no sparsity)
    peak_tf32: float  # fp32 matmuls and convolutions on tensor cores (TF32)
    bandwidth: float
    note: str = ''

    def peak(self, dtype: str) -> float:
        return self.peak_fp16 if dtype in ('float16', 'bfloat16') else self.peak_tf32


# The one table of device constants.
DEVICES: Dict[str, Device] = {
    'A100-SXM': Device(
        'NVIDIA A100-SXM4',
        peak_fp16=312e12,
        peak_tf32=156e12,
        bandwidth=1.555e12,
        note='datasheet; 1.555 TB/s is the 40 GB part (the 80 GB part has 2.04 TB/s)',
    ),
    'H100-SXM': Device(
        'NVIDIA H100-SXM5',
        peak_fp16=989e12,
        peak_tf32=494e12,
        bandwidth=3.35e12,
        note=(
            "datasheet; measured on the project's GPU machine (H100 80 GB): bf16 8192^3 matmul ~790-800 TFLOP/s "
            '(0.80 of the peak), device-to-device copy ~3-4.3 TB/s'
        ),
    ),
}


def op_time(op: OpCost, device: Device) -> float:
    """Seconds of one kernel at the roofline: compute-bound or memory-bound, whichever is slower."""
    return max(op.flops / device.peak(op.dtype), op.bytes / device.bandwidth)


@dataclass(frozen=True)
class Roofline:
    """The roofline of a run: total seconds, and how much of it is bound by compute and by memory."""

    seconds: float
    compute_bound_seconds: float
    memory_bound_seconds: float
    flops: int
    bytes: int
    kernels: int

    def to_dict(self) -> Dict:
        return asdict(self)


def roofline(ops: Iterable[OpCost], device: Device) -> Roofline:
    ops = list(ops)
    compute = memory = 0.0
    for op in ops:
        t_flops, t_bytes = op.flops / device.peak(op.dtype), op.bytes / device.bandwidth
        if t_flops >= t_bytes:
            compute += t_flops
        else:
            memory += t_bytes
    return Roofline(
        seconds=compute + memory,
        compute_bound_seconds=compute,
        memory_bound_seconds=memory,
        flops=sum(op.flops for op in ops),
        bytes=sum(op.bytes for op in ops),
        kernels=len(ops),
    )


def time_by_op(ops: Iterable[OpCost], device: Device, top: int = 8) -> List[Dict]:
    """The ops that take the most roofline time, grouped by aten op and dtype."""
    groups: Dict[tuple, float] = {}
    for op in ops:
        key = (op.op, op.dtype)
        groups[key] = groups.get(key, 0.0) + op_time(op, device)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return [{'op': op, 'dtype': dtype, 'seconds': seconds} for (op, dtype), seconds in ranked]


def calibrate(roofline_seconds: float, images: int, measured_img_per_s: float) -> float:
    """The efficiency factor that makes the roofline's throughput equal one measured throughput:
    measured time = roofline time / efficiency."""
    if roofline_seconds <= 0 or measured_img_per_s <= 0:
        raise ValueError(f'calibration needs positive times and rates, got {roofline_seconds} s, {measured_img_per_s}')
    return measured_img_per_s * roofline_seconds / images


def predicted_img_per_s(roofline_seconds: float, images: int, efficiency: float) -> float:
    return efficiency * images / roofline_seconds
