"""Device and dtype policy: one explicit object, decided once per model, never at import time.

CUDA -> fp16 (bf16 on request), MPS -> fp16. CPU -> fp32, or, in ``auto``, bf16 for the UNet and
the VAE when the CPU computes bf16 natively (AVX512-BF16 / AMX) and the model is large enough for
it to pay (a full-size SD UNet: about 2x faster per step, see ``benchmarks/step.py``). In that
mixed mode the latents, the scheduler's arithmetic and the text encoder stay fp32: only the
UNet's and the VAE's insides run in bf16, so errors do not pile up across steps.

Half precision (fp16) is never used for a CPU computation: it is ~50x slower there and many
kernels do not exist (``"slow_conv2d_cpu" not implemented for 'Half'``), so asking for it is a
clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequest

# bf16 pays on a CPU only when the work is large: below this many UNet parameters (the tiny test
# models, the bundled mini model) the casts cost more than they save and results stay bit-exact fp32.
CPU_BF16_MIN_UNET_PARAMS = 200_000_000


@dataclass(frozen=True)
class DevicePolicy:
    device: str  # "cuda", "cuda:1", "mps", "cpu"
    dtype_name: str  # the UNet's dtype: "fp32" | "fp16" | "bf16"
    vae_dtype_name: str
    text_dtype_name: str | None = None  # the text encoder's and the latents' dtype; None: same as the UNet
    channels_last: bool = False  # UNet/VAE convolutions in NHWC (faster with oneDNN and on tensor cores)
    compile: bool = False  # torch.compile the UNet (pays after a slow first run; opt-in)
    why: str = ""  # one line on how the precision was chosen, for notes and benchmarks
    # where the UNet, the VAE decoder and the text encoders run on a CPU: "torch" (eager) or "openvino" (engine/backends.py)
    backend: str = "torch"
    # one line for the user when the backend asked for is not the one used (not installed, not for this device)
    backend_note: str = ""

    @property
    def dtype(self):
        return _torch_dtype(self.dtype_name)

    @property
    def vae_dtype(self):
        return _torch_dtype(self.vae_dtype_name)

    @property
    def text_dtype(self):
        return _torch_dtype(self.text_dtype_name or self.dtype_name)

    @property
    def latent_dtype(self):
        """The dtype the latents (and the scheduler's arithmetic) are kept in between steps."""
        return self.text_dtype

    @property
    def mixed(self) -> bool:
        return (self.text_dtype_name or self.dtype_name) != self.dtype_name

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"

    def describe(self) -> str:
        on = " on OpenVINO" if self.backend == "openvino" else ""
        if self.mixed:
            return f"{self.device} {self.dtype_name} (UNet, VAE), {self.text_dtype_name} (text encoder, latents)"
        return f"{self.device} {self.dtype_name}{on}"


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


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX), so oneDNN's bf16 kernels are fast."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    # oneDNN also "supports" bf16 on plain AVX512 by emulation, which is slower than fp32: ask the CPU itself
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no way to tell cheaply, so stay with fp32
        pass
    return set()


def cpu_threads(current: int, *, cgroup: str = "/sys/fs/cgroup") -> int:
    """CPU threads for torch: its default (one per physical core), but never more than the CPUs this
    process may run on (its affinity) or its container's CPU quota (cgroup v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``). A container limited to 2 CPUs on a 64-core host otherwise runs 32 threads
    that fight over 2 CPUs, several times slower than 2 threads."""
    import math
    import os
    from pathlib import Path

    limit = current
    if hasattr(os, "sched_getaffinity"):
        limit = min(limit, len(os.sched_getaffinity(0)))
    quota = period = None
    try:
        text = (Path(cgroup) / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            quota, period = float(text[0]), float(text[1])
    except (OSError, ValueError):
        try:
            quota = float((Path(cgroup) / "cpu" / "cpu.cfs_quota_us").read_text())
            period = float((Path(cgroup) / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota and period and quota > 0:
        limit = min(limit, max(1, math.ceil(quota / period)))
    return max(1, limit)


def choose(device: str = "auto", precision: str = "auto", *, unet_params: int | None = None,
           compile: bool = False, backend: str = "auto") -> DevicePolicy:
    """Pick the device (auto: CUDA, then MPS, then CPU), the dtypes and the CPU backend for it.

    ``unet_params`` is the size of the model about to run; on a CPU, ``auto`` precision picks bf16
    only for large models and only where the CPU has native bf16. Without it, ``auto`` means fp32.
    ``backend`` (``engine.backends``): ``auto`` takes OpenVINO for a large model on a CPU without native bf16
    where it is installed (1.2x torch per UNet step on AVX2); ``torch`` never; ``openvino`` wherever it can.
    """
    import dataclasses

    from .backends import check_backend

    backend = check_backend(backend)
    policy = _choose(device, precision, unet_params=unet_params, compile=compile)
    return dataclasses.replace(policy, **_backend_for(policy, backend, precision, unet_params))


def _backend_for(policy: DevicePolicy, asked: str, precision, unet_params: int | None) -> dict:
    from .backends import openvino_missing

    if asked == "torch":
        return {"backend": "torch"}
    if not policy.is_cpu:
        note = "" if asked == "auto" else f"OpenVINO is a CPU backend; {policy.device} runs torch"
        return {"backend": "torch", "backend_note": note}
    missing = openvino_missing()
    if asked == "openvino":
        if missing:
            return {"backend": "torch", "backend_note": f"{missing}; torch runs instead"}
        fp32 = {}
        if policy.dtype_name != "fp32":
            if (getattr(precision, "value", precision) or "auto") != "auto":
                from ..errors import InvalidRequest

                raise InvalidRequest("the OpenVINO backend computes in fp32; use --precision auto or fp32, "
                                     "or --backend torch for bf16")
            fp32 = {"dtype_name": "fp32", "vae_dtype_name": "fp32", "text_dtype_name": None, "channels_last": False}
        return {"backend": "openvino", "compile": False, "why": "fp32; OpenVINO (asked for)" if fp32 else
                policy.why + "; OpenVINO (asked for)", **fp32}
    if missing or policy.dtype_name != "fp32" or unet_params is None or unet_params < CPU_BF16_MIN_UNET_PARAMS:
        return {"backend": "torch"}  # small models: a conversion would cost more than it saves
    # OpenVINO holds its own copy of the UNet's weights; torch's (which LoRAs and fast mode still use) is then
    # mapped from the cache (backends.OpenVinoModel._spill), but the conversion needs both for a while
    need = unet_params * 4 + OPENVINO_MARGIN_BYTES
    if (free := memory_available()) is not None and free < need:
        return {"backend": "torch", "why": policy.why + f"; torch, not OpenVINO ({free / 2**30:.1f} GB of memory free, "
                                                        f"its copy of the UNet needs ~{need / 2**30:.1f} GB)"}
    return {"backend": "openvino", "compile": False,
            "why": policy.why + "; OpenVINO for the UNet, the VAE decoder and the text encoders (installed; faster "
                                "than torch here)"}


# what a conversion and a 512x512 run add beside OpenVINO's copy of the UNet's weights
OPENVINO_MARGIN_BYTES = 2 * 2**30


def memory_available() -> int | None:
    """Bytes of memory free for a new allocation (Linux' MemAvailable); None where it cannot be told."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _choose(device: str, precision, *, unet_params: int | None, compile: bool) -> DevicePolicy:
    import torch

    device = (device or "auto").lower()
    precision = getattr(precision, "value", precision) or "auto"
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise InvalidRequest(f"unknown precision {precision!r}; choose one of: auto, fp32, fp16, bf16")
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
        if precision == "fp32":
            return DevicePolicy("cpu", "fp32", "fp32", compile=compile, why="fp32 (asked for)")
        if precision == "bf16":
            return DevicePolicy("cpu", "bf16", "bf16", "fp32", channels_last=True, compile=compile,
                                why="bf16 (asked for)")
        if unet_params is None or unet_params < CPU_BF16_MIN_UNET_PARAMS:
            return DevicePolicy("cpu", "fp32", "fp32", compile=compile, why="fp32 (small model: bf16 would not pay)")
        if not cpu_has_native_bf16():
            return DevicePolicy("cpu", "fp32", "fp32", compile=compile, why="fp32 (this CPU has no native bf16)")
        return DevicePolicy("cpu", "bf16", "bf16", "fp32", channels_last=True, compile=compile,
                            why="bf16 (the CPU has native bf16)")
    if precision in ("auto", "fp16"):
        dtype = "fp16"
    else:
        dtype = precision
    on_cuda = device.startswith("cuda")
    return DevicePolicy(device, dtype, dtype, channels_last=on_cuda, compile=compile and on_cuda,
                        why=f"{dtype} ({'asked for' if precision != 'auto' else 'default for ' + device})")


def unet_param_count(parts) -> int:
    return sum(p.numel() for p in parts.unet.parameters())


def place(parts, policy: DevicePolicy, *, to_device: bool = True) -> None:
    """Cast the components to the policy's dtypes and layout; move them to the device unless told not to
    (the memory plan moves them later, so a model larger than the GPU can still load)."""
    import torch

    vae_dtype = policy.vae_dtype
    if vae_dtype == torch.float16 and getattr(parts.vae.config, "force_upcast", False):
        vae_dtype = torch.float32  # SDXL's VAE overflows in fp16 (black / NaN pictures): fp32, as diffusers runs it
    for module, dtype in ((parts.unet, policy.dtype), *((te, policy.text_dtype) for te in parts.text_encoders),
                          (parts.vae, vae_dtype)):
        if module.dtype != dtype:
            module.to(dtype=dtype)
        if to_device:
            module.to(policy.device)
        module.eval()
    if policy.channels_last:
        for module in (parts.unet, parts.vae):
            module.to(memory_format=torch.channels_last)
    if policy.mixed:
        cast_io(parts.unet, policy.dtype, policy.latent_dtype)
    if policy.compile:
        parts.unet.compile(dynamic=False)


def cast_io(module, inner, outer) -> None:
    """Make ``module`` take tensors of the ``outer`` dtype and return them in it, computing in ``inner``.

    Once per module: the pipeline then keeps its latents in ``outer`` (fp32) and only the module's
    own arithmetic runs in ``inner`` (bf16).
    """
    import torch

    if getattr(module, "_brushwork_cast_io", None) == (inner, outer):
        return
    for handle in getattr(module, "_brushwork_cast_handles", ()):
        handle.remove()

    def down(x):
        if isinstance(x, dict):  # added_cond_kwargs (SDXL's pooled text embeddings, time ids)
            return {k: down(v) for k, v in x.items()}
        return x.to(inner) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def up(x):
        return x.to(outer) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def pre(_module, args, kwargs):
        # the timestep stays as it is: 999 in bf16 is 1000, and the UNet embeds it in fp32 anyway
        args = (down(args[0]), *args[1:]) if args else args
        return args, {k: (v if k == "timestep" else down(v)) for k, v in kwargs.items()}

    def post(_module, _args, _kwargs, output):
        if isinstance(output, tuple):
            return tuple(up(o) for o in output)
        if hasattr(output, "sample"):
            output.sample = up(output.sample)
            return output
        return up(output)

    module._brushwork_cast_handles = (
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post, with_kwargs=True),
    )
    module._brushwork_cast_io = (inner, outer)
