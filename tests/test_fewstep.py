"""Few-step models (SD-Turbo, SDXL-Turbo, LCM): recognised from the file, their defaults filled only where the
request leaves them open, and the same pixels as plain diffusers run the way their model cards say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from brushwork import GenerationRequest, InvalidRequest, Mode
from brushwork.models import fewstep
from brushwork.models.families import SD_SCHEDULER_CONFIG
from brushwork.models.load import load_single_file, recommended_defaults

PROMPT = "a lighthouse at dusk"
# the two ways a file says it is a Turbo model (the official files say it by their hash: test_known_files_...)
TURBO_MARKS = {
    "modelspec": {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v2-512",
                  "modelspec.implementation": "sgm", "modelspec.title": "SD-Turbo"},
    "brushwork.defaults": {"brushwork.defaults": json.dumps({"turbo": True})},
}


@pytest.fixture(scope="module")
def turbo(tmp_path_factory):
    """Tiny SD 2.x single files (SD-Turbo's layout: SD 2.1's keys), marked as Turbo each way, plus an unmarked one."""
    from tinymodels import save_single

    root = tmp_path_factory.mktemp("turbo")
    files = {mark: save_single(root / f"sd-turbo-{mark}.safetensors", "sd2", metadata=metadata)
             for mark, metadata in TURBO_MARKS.items()}
    files["plain"] = save_single(root / "plain-sd2.safetensors", "sd2")
    return files


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """A tiny LCM model: an SD 1.x UNet that embeds the guidance scale (time_cond_proj_dim), as a single file."""
    from tinymodels import save_single

    return save_single(tmp_path_factory.mktemp("lcm") / "lcm.safetensors", "sd1", time_cond_proj_dim=32)


def px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def _diffusers(path: Path, scheduler, *, seed: int, size: int, steps: int, guidance: float, pipeline=None, **kw):
    """Plain diffusers on the same weights, with the CPU noise brushwork draws (one generator per image: the
    starting latents first, then whatever the sampler draws)."""
    import diffusers

    parts = load_single_file(path, prediction="eps")
    cls = getattr(diffusers, pipeline or "StableDiffusionPipeline")
    pipe_kw = {} if pipeline == "LatentConsistencyModelPipeline" else {"requires_safety_checker": False}
    pipe = cls(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
               scheduler=scheduler, safety_checker=None, feature_extractor=None, **pipe_kw)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)  # the tiny VAE's; 8 for SD's
    if "image" not in kw:
        kw["latents"] = torch.randn((1, 4, size // factor, size // factor), generator=generator)
        kw.update(height=size, width=size)
    with torch.inference_mode():
        return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, generator=[generator],
                    **kw).images[0]


@pytest.mark.parametrize("mark", list(TURBO_MARKS))
def test_an_sd_turbo_file_just_works_from_the_command_line_as_diffusers_runs_it(turbo, tmp_path, mark):
    """`brushwork txt2img "..." --model sd-turbo.safetensors`: 1 step, no CFG, trailing timesteps, Euler a; the
    same pixels as diffusers' SD-Turbo recipe (EulerAncestralDiscreteScheduler, timestep_spacing "trailing",
    num_inference_steps 1, guidance_scale 0.0)."""
    from diffusers import EulerAncestralDiscreteScheduler

    from brushwork.cli import main

    result = CliRunner().invoke(main, ["txt2img", PROMPT, "--model", str(turbo[mark]), "-W", "64", "-H", "64",
                                       "--seed", "3", "--outdir", str(tmp_path), "--no-watermark"])
    assert result.exit_code == 0, result.output
    assert "is a Turbo model" in result.stderr and "1 step, CFG 1" in result.stderr
    png = Path(result.stdout.split()[0])
    text = Image.open(png).info["parameters"]
    assert "\nSteps: 1, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 1, Seed: 3, Size: 64x64," in text
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    theirs = _diffusers(turbo[mark], scheduler, seed=3, size=64, steps=1, guidance=0.0)
    assert np.array_equal(px(Image.open(png)), px(theirs))


def test_sd_turbo_with_euler_is_diffusers_euler_on_trailing_timesteps(turbo, engine):
    from diffusers import EulerDiscreteScheduler

    ours = engine.generate(GenerationRequest(prompt=PROMPT, model=str(turbo["modelspec"]), sampler="Euler", seed=5,
                                             width=64, height=64, watermark=False))
    assert "Steps: 1, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 1," in ours.infotexts[0]
    scheduler = EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    theirs = _diffusers(turbo["modelspec"], scheduler, seed=5, size=64, steps=1, guidance=0.0)
    # A1111's SGM Uniform at 1 step is the training sigma at t = 999: the same timestep, the same pixels
    assert np.array_equal(px(ours.images[0]), px(theirs))


def test_a_request_that_says_otherwise_keeps_its_own_and_no_turbo_turns_the_defaults_off(turbo, engine):
    common = dict(prompt=PROMPT, model=str(turbo["brushwork.defaults"]), seed=1, width=32, height=32,
                  watermark=False)
    own = engine.generate(GenerationRequest(**common, steps=2, cfg_scale=3, sampler="Euler", scheduler="Karras"))
    assert "Steps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 3," in own.infotexts[0]
    assert not any("is a Turbo model" in note for note in own.notes)  # nothing was filled: nothing to say
    partly = engine.generate(GenerationRequest(**common, cfg_scale=2))
    assert "Steps: 1, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 2," in partly.infotexts[0]
    plain = engine.generate(GenerationRequest(**common, turbo=False))
    assert "Steps: 20, Sampler: Euler a, CFG scale: 7," in plain.infotexts[0]
    # a combined sampler name keeps its own schedule
    named = engine.generate(GenerationRequest(**common, sampler="DPM++ 2M Karras"))
    assert "Steps: 1, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 1," in named.infotexts[0]


def test_the_infotext_remakes_a_turbo_picture_on_any_copy_of_the_weights(turbo, engine):
    from brushwork.output.infotext import request_from_infotext

    first = engine.generate(GenerationRequest(prompt=PROMPT, model=str(turbo["modelspec"]), seed=8, width=32,
                                              height=32, watermark=False))
    again = request_from_infotext(first.infotexts[0])
    assert (again["steps"], again["cfg_scale"], again["scheduler"]) == (1, 1.0, "SGM Uniform")
    # the same weights unmarked (an SD 2.x file says nothing of its prediction: eps, as SD-Turbo)
    remade = engine.generate(GenerationRequest(**{**again, "model": str(turbo["plain"]), "prediction": "eps",
                                                  "watermark": False}))
    assert np.array_equal(px(first.images[0]), px(remade.images[0]))


def test_known_files_are_recognised_by_their_hash():
    assert fewstep.known_file("3f067a1b94") == ("turbo", "sd_turbo.safetensors")
    assert fewstep.known_file("E869AC7D69") == ("turbo", "sd_xl_turbo_1.0_fp16.safetensors")
    assert fewstep.known_file("2e58e3704b") == ("turbo", "sd_xl_turbo_1.0.safetensors")
    assert fewstep.known_file("df955bdf6b") is None and fewstep.known_file(None) is None  # SD 2.1 512 is not Turbo
    assert fewstep.kind_of_file({}, lambda: "3f067a1b94") == ("turbo", "known file sd_turbo.safetensors")
    assert fewstep.kind_of_file({}, lambda: "0123456789") == (None, "")
    # the file's own word comes first, and the hash is not even asked for then
    assert fewstep.kind_of_file(TURBO_MARKS["modelspec"], lambda: pytest.fail("hashed")) == \
        ("turbo", "its modelspec.title")
    off = {"brushwork.defaults": '{"turbo": false}'}
    assert fewstep.kind_of_file(off, lambda: "3f067a1b94") == (None, "its brushwork.defaults")


def test_the_official_sd_turbo_file_needs_no_flag(turbo, tmp_path):
    """SD-Turbo's keys are SD 2.1's, which cannot tell eps from v: its hash says Turbo, and Turbo says eps, 512."""
    from brushwork.engine.run import model_defaults

    parts = load_single_file(turbo["plain"], short_hash=lambda: "3f067a1b94")
    assert (parts.fewstep, parts.prediction, parts.default_size) == ("turbo", "eps", (512, 512))
    request, notes = model_defaults(GenerationRequest(prompt="x"), parts)
    assert (request.steps, request.cfg_scale, request.sampler, request.scheduler) == (1, 1.0, "Euler a", "SGM Uniform")
    assert "(known file sd_turbo.safetensors)" in notes[0]
    # --turbo on an unmarked SD 2.x file: eps, and the Turbo defaults including its 512x512
    plain = load_single_file(turbo["plain"], turbo=True)
    assert plain.prediction == "eps" and plain.fewstep is None
    forced, _ = model_defaults(GenerationRequest(prompt="x", turbo=True), plain)
    assert (forced.steps, forced.cfg_scale, forced.width, forced.height) == (1, 1.0, 512, 512)
    assert model_defaults(GenerationRequest(prompt="x", turbo=True, width=640), plain)[0].height == 512
    assert model_defaults(GenerationRequest(prompt="x"), plain)[0].steps == 20


def test_turbo_img2img_keeps_steps_times_strength_at_least_one(turbo, engine):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    common = dict(prompt=PROMPT, model=str(turbo["modelspec"]), mode=Mode.IMG2IMG, init_image=init, seed=4,
                  watermark=False)
    raised = engine.generate(GenerationRequest(**common, strength=0.5))
    assert raised.request.steps == 2 and "Steps: 2," in raised.infotexts[0]
    assert any("steps raised from 1 to 2" in note for note in raised.notes)
    assert np.abs(px(raised.images[0]) - px(init)).mean() > 5  # denoised, not handed back
    # on diffusers' trailing timesteps ("Simple"), exactly diffusers' SD-Turbo img2img: 2 steps x 0.5
    from diffusers import EulerAncestralDiscreteScheduler

    simple = engine.generate(GenerationRequest(**common, strength=0.5, scheduler="Simple"))
    scheduler = EulerAncestralDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_spacing="trailing")
    theirs = _diffusers(turbo["modelspec"], scheduler, seed=4, size=32, steps=2, guidance=0.0, image=init,
                        strength=0.5, pipeline="StableDiffusionImg2ImgPipeline")
    assert np.array_equal(px(simple.images[0]), px(theirs))
    assert engine.generate(GenerationRequest(**common, strength=0.3)).request.steps == 4  # int(4 x 0.3) = 1
    assert engine.generate(GenerationRequest(**common, strength=0.5, steps=4)).request.steps == 4  # enough already


def test_a_files_own_recommendations_are_checked_as_the_request_checks_them(tmp_path, engine):
    from tinymodels import save_single

    raw = {"steps": 3, "sampler": "DDIM", "scheduler": "sgm_uniform", "width": 40, "height": 500, "cfg_scale": 2,
           "turbo": "yes"}
    path = save_single(tmp_path / "m.safetensors", "sd1", metadata={"brushwork.defaults": json.dumps(raw)})
    assert recommended_defaults(path) == {"steps": 3, "sampler": "DDIM", "scheduler": "SGM Uniform", "width": 40,
                                          "cfg_scale": 2.0}  # height 500 is no multiple of 8; "yes" is no bool
    for bad in ({"steps": 0}, {"steps": 2.5}, {"sampler": "Euler b"}, {"scheduler": "weird"}, {"width": -8},
                {"cfg_scale": 1000}, {"steps": True}):
        assert fewstep.file_defaults({"brushwork.defaults": json.dumps(bad)}) == {}, bad
    result = engine.generate(GenerationRequest(prompt=PROMPT, model=str(path), seed=2, height=32, watermark=False))
    assert "Steps: 3, Sampler: DDIM, Schedule type: SGM Uniform, CFG scale: 2, Seed: 2, Size: 40x32," in \
        result.infotexts[0]
    # a Turbo file's recommendation, for the model list (the web UI), without loading it
    turbo = save_single(tmp_path / "t.safetensors", "sd2", metadata={**TURBO_MARKS["modelspec"],
                                                                     "brushwork.defaults": '{"steps": 2}'})
    assert recommended_defaults(turbo) == {**fewstep.PROFILES["turbo"], "steps": 2}


# ---- LCM -----------------------------------------------------------------------------------------------------


def test_an_lcm_unet_is_read_from_the_file_and_every_tensor_kept(lcm):
    from tinymodels import build_components

    parts = load_single_file(lcm)
    assert parts.unet.config.time_cond_proj_dim == 32
    original = build_components("sd1", time_cond_proj_dim=32)[0].state_dict()
    loaded = parts.unet.state_dict()
    assert original.keys() == loaded.keys() and "time_embedding.cond_proj.weight" in loaded
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    assert recommended_defaults(lcm) == fewstep.PROFILES["lcm"]  # from the header's keys alone


def test_an_lcm_model_runs_as_diffusers_lcm_pipeline(lcm, engine):
    """The LCM sampler, 4 steps, guidance 8.5 as the UNet's w-embedding (no CFG batch): the same pixels as
    diffusers' LatentConsistencyModelPipeline with LCMScheduler on the same weights."""
    from diffusers import LCMScheduler

    ours = engine.generate(GenerationRequest(prompt=PROMPT, model=str(lcm), seed=6, width=32, height=32,
                                             watermark=False))
    assert "Steps: 4, Sampler: LCM, CFG scale: 8.5," in ours.infotexts[0]
    assert any("is an LCM model" in note for note in ours.notes)
    theirs = _diffusers(lcm, LCMScheduler.from_config(SD_SCHEDULER_CONFIG), seed=6, size=32, steps=4, guidance=8.5,
                        pipeline="LatentConsistencyModelPipeline")
    assert np.array_equal(px(ours.images[0]), px(theirs))
    # the guidance is the UNet's input, not CFG: another scale, another picture, the same single UNet pass
    other = engine.generate(GenerationRequest(prompt=PROMPT, model=str(lcm), seed=6, width=32, height=32,
                                              cfg_scale=2.0, watermark=False))
    assert not np.array_equal(px(ours.images[0]), px(other.images[0]))


def test_the_lcm_sampler_recommends_few_steps_and_no_cfg_and_takes_schedule_types(tiny, engine):
    from brushwork.engine.samplers import build_scheduler
    from brushwork.models.load import scheduler_config

    result = engine.generate(GenerationRequest(prompt=PROMPT, model=str(tiny["sd1"]["safetensors"]), sampler="LCM",
                                               seed=1, width=32, height=32, watermark=False))
    assert "Steps: 4, Sampler: LCM, CFG scale: 1," in result.infotexts[0]  # an LCM-LoRA's: no CFG

    def timesteps(schedule, steps=4):
        scheduler = build_scheduler(scheduler_config("eps"), "LCM", schedule)
        scheduler.set_timesteps(steps)
        return [int(t) for t in scheduler.timesteps]

    assert timesteps("Automatic") == [999, 759, 499, 259]  # LCM's own: a part of its 50-step grid
    assert timesteps("SGM Uniform") == timesteps("Simple") == [999, 749, 499, 249]  # trailing
    assert timesteps("Uniform") == [999, 666, 333, 0]
    assert timesteps("DDIM") == [751, 501, 251, 1]
    with pytest.raises(InvalidRequest, match="the LCM sampler takes at most 50 steps"):
        engine.generate(GenerationRequest(prompt=PROMPT, model=str(tiny["sd1"]["safetensors"]), sampler="LCM",
                                          steps=60, width=32, height=32))


# ---- SGM Uniform ---------------------------------------------------------------------------------------------


def _a1111_sgm_uniform(n: int) -> list[float]:
    """A1111's modules/sd_schedulers.py sgm_uniform over k-diffusion's DiscreteSchedule (sigma_to_t, t_to_sigma)
    for SD's training schedule, in float64."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    log_sigmas = sigmas.log()

    def sigma_to_t(sigma):
        dists = sigma.log() - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        w = ((log_sigmas[low] - sigma.log()) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(t):
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    start, end = sigma_to_t(sigmas[-1:]), sigma_to_t(sigmas[:1])
    return [float(t_to_sigma(t)) for t in torch.linspace(float(start), float(end), n + 1, dtype=torch.float64)[:-1]]


@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "Heun", "LMS"])
def test_sgm_uniform_is_a1111s_sigmas(sampler):
    from brushwork.engine.samplers import build_scheduler
    from brushwork.models.load import scheduler_config

    for n in (1, 4, 7):
        scheduler = build_scheduler(scheduler_config("eps"), sampler, "SGM Uniform")
        scheduler.set_timesteps(n)
        sigmas = np.asarray(scheduler.sigmas, dtype=np.float64)
        if sampler == "Heun":  # a second-order class keeps each inner sigma twice
            sigmas = np.concatenate([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        np.testing.assert_allclose(sigmas, [*_a1111_sgm_uniform(n), 0.0], rtol=1e-5)
        assert float(scheduler.init_noise_sigma) == pytest.approx(float(sigmas[0]), rel=1e-6)  # k-diffusion: x sigma_max
    # Euler a steps on A1111's fractional timesteps; at 1 step, exactly diffusers' trailing
    euler_a = build_scheduler(scheduler_config("eps"), "Euler a", "SGM Uniform")
    euler_a.set_timesteps(4)
    assert [float(t) for t in euler_a.timesteps] == [999.0, 749.25, 499.5, 249.75]
    trailing = build_scheduler(scheduler_config("eps"), "Euler a", "Simple")
    for scheduler in (euler_a, trailing):
        scheduler.set_timesteps(1)
    assert torch.equal(euler_a.timesteps, trailing.timesteps) and torch.equal(euler_a.sigmas, trailing.sigmas)


def test_a_turbo_diffusers_folder_is_known_by_its_name(tiny, tmp_path):
    from brushwork.models.load import load_diffusers_folder

    folder = tmp_path / "sd-turbo"
    shutil.copytree(tiny["sd1"]["diffusers"], folder)
    assert load_diffusers_folder(folder).fewstep == "turbo"
    cached = tmp_path / "hub" / "models--stabilityai--sd-turbo" / "snapshots" / "abc"
    shutil.copytree(tiny["sd1"]["diffusers"], cached)
    assert load_diffusers_folder(cached).fewstep_why == "known model stabilityai/sd-turbo"
    assert load_diffusers_folder(tiny["sd1"]["diffusers"]).fewstep is None
