"""Device and dtype policy: one explicit object, decided once per run, never at import time.

CUDA -> fp16 (bf16 on request), MPS -> fp16, CPU -> fp32 (bf16 on request). Half precision is
never used for a CPU computation: it is slow there and many kernels do not exist
(``"slow_conv2d_cpu" not implemented for 'Half'``), so asking for it is a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..request import InvalidRequest


@dataclass(frozen=True)
class DevicePolicy:
    device: str  # "cuda", "cuda:1", "mps", "cpu"
    dtype_name: str  # "fp32" | "fp16" | "bf16"
    vae_dtype_name: str

    @property
    def dtype(self):
        return _torch_dtype(self.dtype_name)

    @property
    def vae_dtype(self):
        return _torch_dtype(self.vae_dtype_name)

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"

    def describe(self) -> str:
        return f"{self.device} {self.dtype_name}"


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def available_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def choose(device: str = "auto", precision: str = "auto") -> DevicePolicy:
    """Pick the device (auto: CUDA, then MPS, then CPU) and the dtype for it."""
    import torch

    device = (device or "auto").lower()
    precision = getattr(precision, "value", precision) or "auto"
    if device == "auto":
        device = available_device()
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidRequest("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    elif device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InvalidRequest("--device mps was asked for but MPS is not available; use --device cpu")
    elif device != "cpu":
        raise InvalidRequest(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps")

    if device == "cpu":
        if precision == "fp16":
            raise InvalidRequest(
                "half precision (fp16) does not run on a CPU; use --precision fp32 (the default) or bf16"
            )
        dtype = "bf16" if precision == "bf16" else "fp32"
        return DevicePolicy("cpu", dtype, dtype)
    if precision in ("auto", "fp16"):
        dtype = "fp16"
    else:
        dtype = precision
    return DevicePolicy(device, dtype, dtype)
