"""One table: the sampler names people know -> a diffusers scheduler class and its overrides.

Names follow A1111 (v1.9+): a sampler ("DPM++ 2M") plus a schedule type ("Karras"). The old
combined names ("DPM++ 2M Karras"), ComfyUI/k-diffusion spellings ("dpmpp_2m_karras",
"euler_ancestral", "k_lms") and any case are accepted. Schedulers are always built fresh with
``Cls.from_config({**base, **overrides})``; a shared scheduler config is never mutated. For the sigma schedules
diffusers has no flag for (Polyexponential, KL Optimal, Align Your Steps, SGM Uniform) ``Cls`` is a small subclass
whose Karras path yields A1111's sigmas; Euler a on SGM Uniform, and LCM on a schedule type other than Automatic,
are subclasses that set their own timesteps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest

# Schedule types (A1111 v1.9+ names), as diffusers can express them: a spacing of the model's own timesteps,
# which every scheduler class takes, or a sigma schedule, which only the k-diffusion-style classes take.
SPACING_SCHEDULES: dict[str, dict[str, Any]] = {
    "Automatic": {},  # the model's own (SD: "leading", as diffusers and the original scripts)
    "Uniform": {"timestep_spacing": "linspace"},  # k-diffusion's default: timesteps evenly from the end
    # A1111's sgm_uniform (``sgm_uniform``) for the classes that take sigmas and for Euler a; DDIM, PLMS and LCM
    # step on whole timesteps: "trailing", within one timestep of A1111's (the same at 1 step)
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Simple": {"timestep_spacing": "trailing"},  # ComfyUI's: every (n/steps)-th sigma from the end
    "Normal": {"timestep_spacing": "trailing"},  # ComfyUI's: time-linear from the end
    "DDIM": {"timestep_spacing": "leading", "steps_offset": 1},  # A1111's ddim_uniform
}
# The sigma schedules diffusers has no flag for are computed here (``custom_sigmas``, A1111's formulas) and handed
# to the scheduler through its Karras path (``use_karras_sigmas``): the class maps each sigma to a timestep with
# its own ``_sigma_to_t`` and appends its own final sigma (0), exactly as it does for Karras.
CUSTOM_SIGMA_SCHEDULES = ("Polyexponential", "KL Optimal", "Align Your Steps")
_KARRAS_PATH = {"use_karras_sigmas": True, "use_exponential_sigmas": False, "use_beta_sigmas": False}
SIGMA_SCHEDULES: dict[str, dict[str, Any]] = {
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},  # Lee et al. 2024, alpha = beta = 0.6 (needs scipy)
    **{name: _KARRAS_PATH for name in CUSTOM_SIGMA_SCHEDULES},
}
# A1111's order (modules/sd_schedulers.py), the order shown to users
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    name: {**SPACING_SCHEDULES, **SIGMA_SCHEDULES}[name]
    for name in ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                 "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
}
assert set(SCHEDULE_TYPES) == {*SPACING_SCHEDULES, *SIGMA_SCHEDULES}
_SPACING = tuple(name for name in SCHEDULE_TYPES if name in SPACING_SCHEDULES)
_EVERY = tuple(SCHEDULE_TYPES)
_SCHEDULE_NEEDS = {"Beta": "scipy"}

# Align Your Steps (NVIDIA, Sabour et al. 2024): the published 10-step sigmas, as A1111 has them
AYS_SIGMAS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),  # SD 1.x and 2.x
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def sgm_uniform(train_sigmas, steps: int) -> tuple[list[float], list[float]]:
    """A1111's SGM Uniform (modules/sd_schedulers.py ``sgm_uniform``): ``steps`` timesteps evenly spaced from the
    last training timestep to the first, that one left out (``torch.linspace(t_max, t_min, steps + 1)[:-1]``),
    each sigma read log-linearly between the training sigmas at its (fractional) timestep, as k-diffusion's
    ``t_to_sigma``. Returns (timesteps, sigmas); the scheduler appends the final sigma 0."""
    import numpy as np

    table = np.asarray(train_sigmas, dtype=np.float64)
    t = np.linspace(len(table) - 1, 0, int(steps) + 1)[:-1]
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - low
    log = np.log(table)
    # a whole timestep takes the training sigma itself (exp(log(x)) may differ from x in the last bit)
    sigmas = np.where(w == 0, table[low], np.exp((1 - w) * log[low] + w * log[high]))
    return [float(x) for x in t], [float(x) for x in sigmas]


def custom_sigmas(schedule: str, steps: int, sigma_min: float, sigma_max: float, xl: bool = False) -> list[float]:
    """The ``steps`` sigmas A1111 samples at for Polyexponential, KL Optimal or Align Your Steps, from the model's
    sigma range (the scheduler appends the final 0 itself)."""
    import numpy as np

    n = int(steps)
    if schedule == "Polyexponential":  # k-diffusion's get_sigmas_polyexponential with A1111's default rho
        rho = 1.0
        ramp = np.linspace(1.0, 0.0, n) ** rho
        sigmas = np.exp(ramp * (np.log(sigma_max) - np.log(sigma_min)) + np.log(sigma_min))
    elif schedule == "KL Optimal":  # A1111's kl_optimal: n + 1 points from sigma_max to sigma_min, the last replaced
        t = np.arange(n) / n  # by the scheduler's final 0
        sigmas = np.tan(t * np.arctan(sigma_min) + (1.0 - t) * np.arctan(sigma_max))
    elif schedule == "Align Your Steps":  # A1111's get_align_your_steps_sigmas and its loglinear_interp
        table = np.array(AYS_SIGMAS["sdxl" if xl else "sd1"])
        if n == len(table):
            sigmas = table
        else:
            ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(table)), np.log(table[::-1]))
            sigmas = np.exp(ys)[::-1]
    else:
        raise ValueError(f"{schedule!r} is not a custom sigma schedule")
    return [float(x) for x in sigmas]


_CUSTOM_CLASSES: dict[tuple[type, str, bool], type] = {}


def _custom_sigma_class(cls: type, schedule: str, xl: bool) -> type:
    """``cls`` whose Karras path yields this schedule's sigmas (one subclass per class and schedule, kept)."""
    key = (cls, schedule, xl)
    if key not in _CUSTOM_CLASSES:
        def _convert_to_karras(self, in_sigmas, num_inference_steps=None):
            import numpy as np

            # the model's whole sigma range, as A1111 (model.sigmas[0], [-1]), whatever the timestep spacing
            train = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
            steps = num_inference_steps or self.num_inference_steps
            if schedule == "SGM Uniform":
                return np.array(sgm_uniform(np.asarray(train), steps)[1])
            return np.array(custom_sigmas(schedule, steps, float(train[0]), float(train[-1]), xl=xl))

        name = f"{cls.__name__}{''.join(part.capitalize() for part in schedule.split())}"
        _CUSTOM_CLASSES[key] = type(name, (cls,), {"_convert_to_karras": _convert_to_karras,
                                                   "__module__": __name__, "__doc__": cls.__doc__})
    return _CUSTOM_CLASSES[key]


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111 name
    scheduler: str  # diffusers class name
    overrides: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    schedules: tuple[str, ...] = _EVERY  # schedule types it supports (its class takes sigma schedules, or not)
    needs: str | None = None  # an extra package it needs
    automatic: str = "Automatic"  # what the "Automatic" schedule means for it (A1111 v1.9+)
    # what it needs where neither the request nor the model says (steps, cfg_scale)
    recommends: dict[str, Any] = field(default_factory=dict)


# The order is the order shown to users.
SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m", "dpmpp_2m"), automatic="Karras"),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde", "dpmpp_sde"), needs="torchsde",
            automatic="Karras"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, ("k_dpmpp_2m_sde", "dpmpp_2m_sde"),
            automatic="Exponential"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", {},
            ("k_euler_a", "k_euler_ancestral", "euler_ancestral", "euler_a"), schedules=_SPACING),
    Sampler("Euler", "EulerDiscreteScheduler", {}, ("k_euler", "euler")),
    Sampler("LMS", "LMSDiscreteScheduler", {}, ("k_lms", "lms")),
    Sampler("Heun", "HeunDiscreteScheduler", {}, ("k_heun", "heun")),
    Sampler("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2", "dpm_2"), automatic="Karras"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a", "dpm_2_ancestral"), automatic="Karras"),
    Sampler("DDIM", "DDIMScheduler",
            # A1111's DDIM: timesteps range(0, 1000, 1000 // steps) + 1
            {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False},
            ("ddim",), schedules=_SPACING),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "leading", "steps_offset": 1},
            ("plms", "pndm"), schedules=_SPACING),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, ("uni_pc", "unipc")),
    # LCM (Luo et al. 2023): an LCM model's (or an LCM-LoRA's) few steps. On a model without LCM's guidance embedding
    # (an LCM-LoRA), 4 steps and no CFG, as diffusers' LCM-LoRA guide (CFG 1-2 works; higher burns); an LCM model
    # recommends its own (models/fewstep.py). Automatic: LCM's own timesteps, a part of its 50-step grid
    Sampler("LCM", "LCMScheduler", {}, ("lcm",), schedules=_SPACING, recommends={"steps": 4, "cfg_scale": 1.0}),
)


def _key(name: str) -> str:
    key = name.strip().lower().replace("dpmpp", "dpm++").replace("ancestral", "a")
    key = re.sub(r"^k_", "", key)
    return re.sub(r"[\s_\-]+", "", key)


def _index() -> dict[str, Sampler]:
    index: dict[str, Sampler] = {}
    for sampler in SAMPLERS:
        for name in (sampler.name, *sampler.aliases):
            index[_key(name)] = sampler
    return index


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def parse_sampler(name: str, schedule: str | None = "Automatic") -> tuple[Sampler, str]:
    """Resolve a user's sampler (and schedule type) name; raise a clear error for unknown names.

    A combined name like "DPM++ 2M Karras" overrides ``schedule`` when ``schedule`` is Automatic.
    "Automatic" resolves as in A1111 v1.9+: Karras for DPM++ 2M / SDE and DPM2, Exponential for
    DPM++ 2M SDE, the model's own schedule for the rest. The result names the schedule used.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    index = _index()
    key = _key(name)
    sched = _parse_schedule(schedule or "Automatic")
    sampler = index.get(key)
    if sampler is None:
        for type_name in SCHEDULE_TYPES:
            suffix = _key(type_name)
            if type_name != "Automatic" and key.endswith(suffix) and key[: -len(suffix)] in index:
                sampler = index[key[: -len(suffix)]]
                if sched == "Automatic":
                    sched = type_name
                break
    if sampler is None:
        raise InvalidRequest(f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    if sched == "Automatic":
        sched = sampler.automatic
    if sched not in sampler.schedules:
        raise InvalidRequest(
            f"sampler {sampler.name} does not support the {sched} schedule; choose one of: {', '.join(sampler.schedules)}"
        )
    return sampler, sched


def _parse_schedule(schedule: str) -> str:
    for type_name in SCHEDULE_TYPES:
        if _key(schedule) == _key(type_name):
            return type_name
    raise InvalidRequest(f"unknown schedule type {schedule!r}; choose one of: {', '.join(SCHEDULE_TYPES)}")


def build_scheduler(base_config: dict[str, Any], name: str, schedule: str = "Automatic", xl: bool = False):
    """A new diffusers scheduler for this sampler, from the model's base scheduler config (``xl``: an SDXL model,
    for Align Your Steps' table)."""
    import diffusers

    sampler, sched = parse_sampler(name, schedule)
    for package in (sampler.needs, _SCHEDULE_NEEDS.get(sched)):
        if package:
            try:
                __import__(package)
            except ImportError:
                raise InvalidRequest(f"{sampler.name} with the {sched} schedule needs the package {package}; "
                                     f"run: pip install {package}") from None
    cls = getattr(diffusers, sampler.scheduler)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    # settings of one scheduler that make no sense for another are dropped by from_config
    config.update(sampler.overrides)
    config.update(SCHEDULE_TYPES[sched])
    if sched in CUSTOM_SIGMA_SCHEDULES:
        cls = _custom_sigma_class(cls, sched, xl)
    elif sched == "SGM Uniform" and "Karras" in sampler.schedules:  # a class that takes sigmas: A1111's exactly
        config.update(_KARRAS_PATH)
        cls = _custom_sigma_class(cls, sched, xl)
    elif sched == "SGM Uniform" and sampler.scheduler == "EulerAncestralDiscreteScheduler":
        cls = _spaced_class(cls, "SGM Uniform")
    elif sampler.scheduler == "LCMScheduler" and sched != "Automatic":
        cls = _spaced_class(cls, "spaced")  # LCMScheduler reads no timestep_spacing: the schedule type's timesteps
    return cls.from_config(config)


def _spaced_timesteps(config, steps: int):
    """The whole timesteps a spacing schedule picks (``timestep_spacing`` and ``steps_offset`` of ``config``), as
    diffusers' DDIM computes them, highest first."""
    import numpy as np

    n, total = int(steps), int(config.num_train_timesteps)
    if config.timestep_spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "trailing":
        return (np.round(np.arange(total, 0, -total / n)) - 1).astype(np.int64)
    return (np.arange(n) * (total // n))[::-1].astype(np.int64) + int(config.steps_offset)  # leading


def _spaced_class(cls: type, what: str) -> type:
    """``cls`` with timesteps of its own: Euler a on A1111's SGM Uniform sigmas (fractional timesteps, as A1111's
    k-diffusion Euler a steps), or LCM on the timesteps of the schedule type asked for (LCMScheduler otherwise keeps
    its own 50-step grid, whatever the spacing)."""
    key = (cls, what, False)
    if key not in _CUSTOM_CLASSES:
        if what == "SGM Uniform":
            def set_timesteps(self, num_inference_steps, device=None, **kwargs):
                import numpy as np
                import torch

                cls.set_timesteps(self, num_inference_steps, device, **kwargs)
                train = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
                timesteps, sigmas = sgm_uniform(np.asarray(train), num_inference_steps)
                self.timesteps = torch.tensor(timesteps, dtype=torch.float32, device=device)
                self.sigmas = torch.tensor([*sigmas, 0.0], dtype=torch.float32)  # on the CPU, as the class keeps them
        else:
            def set_timesteps(self, num_inference_steps=None, device=None, original_inference_steps=None,
                              timesteps=None, strength=1.0):
                if timesteps is None and num_inference_steps is not None:
                    timesteps = [int(t) for t in _spaced_timesteps(self.config, num_inference_steps)]
                    num_inference_steps = None
                cls.set_timesteps(self, num_inference_steps, device, original_inference_steps, timesteps, strength)

        name = f"{cls.__name__}{''.join(part.capitalize() for part in what.split())}"
        _CUSTOM_CLASSES[key] = type(name, (cls,), {"set_timesteps": set_timesteps, "__module__": __name__,
                                                   "__doc__": cls.__doc__})
    return _CUSTOM_CLASSES[key]


def named_schedule(name: str) -> str | None:
    """The schedule type a combined sampler name carries ("DPM++ 2M Karras": Karras), else None."""
    if not isinstance(name, str) or _key(name) in _index():
        return None
    try:
        _, sched = parse_sampler(name, "Automatic")
    except InvalidRequest:
        return None
    return sched


def lenient_sampler(name: str, schedule: str | None) -> tuple[str, str, str | None]:
    """As A1111's API: an unknown schedule type, or one this sampler cannot take, falls back to Automatic.
    Returns (sampler, schedule, a note saying what was changed, or None). An unknown sampler is still an error."""
    try:
        parse_sampler(name, schedule)
        return name, schedule or "Automatic", None
    except InvalidRequest as err:
        sampler, _ = parse_sampler(name, "Automatic")  # raises for an unknown sampler
        return name, "Automatic", f"{err}: used {sampler.name} with the Automatic schedule instead"


def display_name(name: str, schedule: str = "Automatic") -> tuple[str, str | None]:
    """(A1111 sampler name, schedule type or None when Automatic), for the infotext."""
    sampler, sched = parse_sampler(name, schedule)
    return sampler.name, (None if sched == "Automatic" else sched)
