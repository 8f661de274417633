"""Generating through the public Engine: determinism, seeds, img2img strength, samplers, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from brushwork import Cancelled, GenerationRequest, InvalidRequest, Mode
from brushwork.engine.samplers import SAMPLERS, parse_sampler


def req(tiny, **kw):
    base = dict(prompt="a red circle on the left", model=str(tiny["sd1"]["safetensors"]), steps=3, seed=1234,
                width=32, height=32, watermark=False)
    base.update(kw)
    return GenerationRequest(**base)


def px(result, i=0):
    return np.asarray(result.images[i]).astype(int)


def test_golden_slice_pins_determinism(tiny, engine):
    result = engine.generate(req(tiny, sampler="Euler a"))
    expected = np.array([[153, 120, 129], [162, 86, 89], [148, 125, 122]])
    assert np.abs(px(result)[-3:, -3:, 0] - expected).max() <= 2
    again = engine.generate(req(tiny, sampler="Euler a"))
    assert np.array_equal(px(result), px(again))


def test_image_i_of_a_batch_uses_seed_plus_i(tiny, engine):
    batch = engine.generate(req(tiny, batch_size=2, n_iter=2))
    assert batch.seeds == [1234, 1235, 1236, 1237]
    assert len(batch.images) == 4
    single = engine.generate(req(tiny, seed=1237))
    assert np.abs(px(batch, 3) - px(single)).max() <= 2  # same picture (batched math may round differently)
    assert np.abs(px(batch, 0) - px(batch, 1)).mean() > 1  # different seeds, different pictures
    assert "Seed: 1237," in batch.infotexts[3]


def test_random_seed_is_reported_and_reproduces(tiny, engine):
    first = engine.generate(req(tiny, seed=-1))
    assert 0 <= first.seed < 2**32
    again = engine.generate(req(tiny, seed=first.seed))
    assert np.array_equal(px(first), px(again))


def _init_image():
    rng = np.random.default_rng(0)
    arr = np.zeros((40, 48, 3), np.uint8)
    arr[:, :24] = (220, 30, 30)
    arr[:, 24:] = (30, 30, 220)
    arr += rng.integers(0, 10, arr.shape, dtype=np.uint8)
    return Image.fromarray(arr)


def test_img2img_strength_zero_returns_the_init_image(tiny, engine):
    init = _init_image()
    result = engine.generate(req(tiny, mode=Mode.IMG2IMG, init_image=init, strength=0.0, width=None, height=None))
    assert result.images[0].size == (48, 40)  # its own size, already a multiple of 8
    assert np.abs(px(result) - np.asarray(init).astype(int)).max() <= 1


def test_img2img_strength_one_ignores_the_init_image(tiny, engine):
    a = engine.generate(req(tiny, mode=Mode.IMG2IMG, init_image=_init_image(), strength=1.0))
    b = engine.generate(req(tiny, mode=Mode.IMG2IMG, init_image=Image.new("RGB", (32, 32), "white"), strength=1.0))
    assert np.abs(px(a) - px(b)).max() <= 1


def test_img2img_partial_strength_depends_on_init_and_is_resized(tiny, engine):
    a = engine.generate(req(tiny, mode=Mode.IMG2IMG, init_image=_init_image(), strength=0.5, steps=4))
    b = engine.generate(req(tiny, mode=Mode.IMG2IMG, init_image=Image.new("RGB", (50, 50), "white"), strength=0.5,
                            steps=4))
    assert a.images[0].size == (32, 32)
    assert np.abs(px(a) - px(b)).mean() > 3
    assert "Denoising strength: 0.5" in a.infotexts[0]


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLERS])
def test_every_sampler_draws(tiny, engine, sampler):
    result = engine.generate(req(tiny, sampler=sampler, steps=2))
    image = px(result)
    assert image.shape == (32, 32, 3) and image.std() > 1
    assert f"Sampler: {sampler}," in result.infotexts[0]


def test_schedule_types_change_the_picture(tiny, engine):
    plain = engine.generate(req(tiny, sampler="Euler", steps=4))
    karras = engine.generate(req(tiny, sampler="Euler", scheduler="Karras", steps=4))
    assert "Schedule type: Karras" in karras.infotexts[0] and "Schedule type" not in plain.infotexts[0]
    assert not np.array_equal(px(plain), px(karras))


def test_automatic_schedule_is_a1111s(tiny, engine):
    auto = engine.generate(req(tiny, sampler="DPM++ 2M", steps=4))
    karras = engine.generate(req(tiny, sampler="DPM++ 2M Karras", steps=4))
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in auto.infotexts[0]
    assert np.array_equal(px(auto), px(karras))


@pytest.mark.parametrize("name,expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")), ("dpmpp_2m_karras", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M SDE", ("DPM++ 2M SDE", "Exponential")), ("Euler", ("Euler", "Automatic")),
    ("euler_ancestral", ("Euler a", "Automatic")), ("k_lms", ("LMS", "Automatic")), ("plms", ("PLMS", "Automatic")),
    ("DPM2 a Karras", ("DPM2 a", "Karras")), ("uni_pc", ("UniPC", "Automatic")),
])
def test_sampler_names_people_use(name, expected):
    sampler, schedule = parse_sampler(name)
    assert (sampler.name, schedule) == expected


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(InvalidRequest, match=r"unknown sampler 'euler_b'; choose one of: DPM\+\+ 2M, .*Euler a"):
        parse_sampler("euler_b")


def test_progress_and_cancel(tiny, engine):
    seen = []
    engine.generate(req(tiny, steps=3), progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3] and seen[-1].fraction == 1.0
    cancel = threading.Event()

    def stop_after_first(info):
        cancel.set()

    with pytest.raises(Cancelled):
        engine.generate(req(tiny, steps=5), progress=stop_after_first, cancel=cancel)


def test_previews_are_images(tiny, engine):
    previews = []
    engine.generate(req(tiny, steps=2), progress=lambda p: previews.append(p.preview), want_previews=True)
    assert all(isinstance(p, Image.Image) for p in previews) and previews[0].size == (32, 32)


@pytest.mark.parametrize("kw,message", [
    (dict(width=65), "not a multiple of 8"), (dict(height=100000), "too large"), (dict(steps=0), "steps"),
    (dict(strength=1.5, mode=Mode.IMG2IMG, init_image=Image.new("RGB", (8, 8))), "strength"),
    (dict(mode=Mode.IMG2IMG), "init image"), (dict(precision="fp16", device="cpu"), "fp16"),
])
def test_bad_requests_are_clear_errors(tiny, engine, kw, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.generate(req(tiny, **kw))


def test_inpainting_model_says_what_it_is(tiny, engine):
    with pytest.raises(InvalidRequest, match="inpainting model"):
        engine.generate(req(tiny, model=str(tiny["sd1-inpaint"]["safetensors"])))


def test_sd2_v_and_eps_both_draw_and_differ(tiny, engine):
    v = engine.generate(req(tiny, model=str(tiny["sd2"]["safetensors"]), prediction="v"))
    eps = engine.generate(req(tiny, model=str(tiny["sd2"]["ckpt"]), prediction="eps"))
    assert px(v).std() > 1 and not np.array_equal(px(v), px(eps))


def test_half_precision_vae_nans_are_redone_in_fp32(tiny):
    """fp16 VAEs overflow to NaN on some latents (black images); the decode is redone in fp32."""
    import torch

    from brushwork.engine.run import decode
    from brushwork.models.load import load_single_file

    vae = load_single_file(tiny["sd1"]["safetensors"]).vae.to(torch.bfloat16)

    def overflow_unless_fp32(module, args, output):
        return output if output.dtype == torch.float32 else output * float("nan")

    vae.decoder.conv_out.register_forward_hook(overflow_unless_fp32)
    images, fell_back = decode(vae, torch.randn(1, 4, 4, 4))
    assert fell_back and vae.dtype == torch.float32
    assert np.asarray(images[0]).std() > 1  # a real picture, not a black square


def test_the_watermark_setting_turns_it_off_for_the_python_api(tiny, tmp_path):
    from brushwork import Engine, Settings
    from brushwork.output.watermark import detect

    request = req(tiny, width=64, height=64, watermark=True)
    on = Engine(Settings(home=tmp_path / "a")).generate(request)
    off = Engine(Settings(home=tmp_path / "b", watermark=False)).generate(request)
    assert detect(on.images[0]).found and not detect(off.images[0]).found


def _stopped_during_first_batch(engine, tiny, which: str, **kw):
    """(result, full): the request run with the ``which`` event (interrupt or skip) set during step 2 of the
    first batch, and the same request run in full."""
    event = threading.Event()

    def progress(info):
        if info.batch == 0 and info.step == 2:
            event.set()

    request = GenerationRequest(prompt="a cat", model=str(tiny["sd1"]["safetensors"]), steps=6, seed=3, width=32,
                                height=32, n_iter=3, watermark=False, **kw)
    result = engine.generate(request, progress=progress, **{which: event})
    assert not event.is_set() or which == "interrupt"  # a skip is used up by the batch it ended
    return result, engine.generate(request)


def test_interrupt_stops_and_keeps_what_is_there(tiny, engine):
    result, full = _stopped_during_first_batch(engine, tiny, "interrupt", batch_size=2)
    assert result.interrupted and len(result.images) == 2 and result.seeds == [3, 4]  # the first batch only
    assert any("interrupted after step 3 of 6" in note for note in result.notes)  # set during step 2, seen after 3
    assert "Seed: 3" in result.infotexts[0]
    assert not full.interrupted and len(full.images) == 6
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(full.images[0]))  # unfinished


def test_skip_ends_the_current_batch_and_goes_on(tiny, engine):
    result, full = _stopped_during_first_batch(engine, tiny, "skip")
    assert not result.interrupted and result.seeds == full.seeds == [3, 4, 5]
    assert any("batch 1 skipped after step 3 of 6" in note for note in result.notes)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(full.images[0]))  # cut short
    for ours, theirs in zip(result.images[1:], full.images[1:], strict=True):  # the next batches ran in full
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_every_schedule_type_runs_with_every_sampler_that_takes_it(tiny, engine):
    from brushwork.engine.samplers import CUSTOM_SIGMA_SCHEDULES, SCHEDULE_TYPES

    seen, euler = {}, {}
    for sampler in SAMPLERS:
        for schedule in sampler.schedules:
            result = engine.generate(req(tiny, sampler=sampler.name, scheduler=schedule, steps=3))
            image = px(result)
            assert image.shape == (32, 32, 3) and image.std() > 1, (sampler.name, schedule)
            if schedule != "Automatic" and schedule != sampler.automatic:
                assert f"Schedule type: {schedule}," in result.infotexts[0]
            seen.setdefault(schedule, []).append(sampler.name)
            if sampler.name == "Euler":
                euler[schedule] = image
    assert set(seen) == set(SCHEDULE_TYPES)  # each schedule type runs with at least one sampler
    # the sigma schedules computed here are real schedules: each its own picture, none the model's own
    for schedule in CUSTOM_SIGMA_SCHEDULES:
        assert len(seen[schedule]) == 9, seen[schedule]  # every sampler whose class takes Karras takes them
        assert not np.array_equal(euler[schedule], euler["Automatic"]), schedule
        assert not any(np.array_equal(euler[schedule], euler[other]) for other in CUSTOM_SIGMA_SCHEDULES
                       if other != schedule), schedule
    # a spacing schedule changes the timesteps, so the picture: trailing (SGM Uniform) vs the model's leading
    leading = engine.generate(req(tiny, sampler="Euler", steps=3))
    trailing = engine.generate(req(tiny, sampler="Euler", scheduler="sgm_uniform", steps=3))
    assert not np.array_equal(px(leading), px(trailing))
    with pytest.raises(InvalidRequest, match="does not support the Karras schedule"):
        engine.generate(req(tiny, sampler="Euler a", scheduler="Karras"))
    for sampler, schedule, label in (("Euler a", "KL Optimal", "KL Optimal"), ("DDIM", "align_your_steps",
                                      "Align Your Steps"), ("LCM", "polyexponential", "Polyexponential")):
        with pytest.raises(InvalidRequest, match=f"sampler {sampler} does not support the {label} schedule"):
            engine.generate(req(tiny, sampler=sampler, scheduler=schedule))
    with pytest.raises(InvalidRequest, match="unknown schedule type 'weird'"):
        engine.generate(req(tiny, sampler="Euler", scheduler="weird"))


def _sd_sigma_range():
    """SD's sigma_min and sigma_max from its betas (scaled_linear 0.00085 .. 0.012, 1000 steps), as k-diffusion."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return sigmas[0], sigmas[-1]


AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]  # NVIDIA's, SD 1.5
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "UniPC", "LMS"])
def test_polyexponential_kl_optimal_and_align_your_steps_are_a1111s_sigmas(sampler):
    """The sigmas the scheduler samples at are A1111's (modules/sd_schedulers.py), from the model's sigma range."""
    import math

    from brushwork.engine.samplers import build_scheduler
    from brushwork.models.load import scheduler_config

    def sigmas(schedule, steps, **kw):
        scheduler = build_scheduler(scheduler_config("eps"), sampler, schedule, **kw)
        scheduler.set_timesteps(steps)
        timesteps = np.asarray(scheduler.timesteps, dtype=float)
        assert timesteps[0] == 999 and np.all(np.diff(timesteps) < 0), (schedule, timesteps)
        return np.asarray(scheduler.sigmas, dtype=np.float64)

    lo, hi = _sd_sigma_range()
    # Polyexponential, rho 1: k-diffusion's get_sigmas_polyexponential, log-linear from sigma_max to sigma_min, 0
    for n in (3, 20):
        expected = [math.exp(math.log(hi) + i / (n - 1) * (math.log(lo) - math.log(hi))) for i in range(n)]
        np.testing.assert_allclose(sigmas("Polyexponential", n), [*expected, 0.0], rtol=1e-4)  # diffusers: float32
    # KL Optimal: A1111's tan(i/n * atan(sigma_min) + (1 - i/n) * atan(sigma_max)) for i in 0..n; its last point
    # (sigma_min) is the scheduler's final sigma, 0, as for every other schedule
    for n in (4, 20):
        a1111 = [math.tan(i / n * math.atan(lo) + (1 - i / n) * math.atan(hi)) for i in range(n + 1)]
        assert a1111[0] == pytest.approx(hi) and a1111[-1] == pytest.approx(lo)
        np.testing.assert_allclose(sigmas("KL Optimal", n), [*a1111[:-1], 0.0], rtol=1e-4)
    # Align Your Steps: A1111 takes the published table as it is when the steps are as many as its sigmas (11)...
    np.testing.assert_allclose(sigmas("Align Your Steps", 11), [*AYS_SD1, 0.0], rtol=1e-6)
    np.testing.assert_allclose(sigmas("Align Your Steps", 11, xl=True), [*AYS_SDXL, 0.0], rtol=1e-6)
    # ... and log-linearly interpolates it otherwise: at 21 steps every other sigma is the table's, halfway
    # between two (in log) the rest
    got = sigmas("Align Your Steps", 21)
    assert len(got) == 22 and got[-1] == 0.0
    np.testing.assert_allclose(got[:-1:2], AYS_SD1, rtol=1e-6)
    np.testing.assert_allclose(got[1:-1:2], np.sqrt(np.array(AYS_SD1[:-1]) * np.array(AYS_SD1[1:])), rtol=1e-5)
    got = sigmas("Align Your Steps", 20)
    assert got[0] == pytest.approx(14.615) and got[-2] == pytest.approx(0.029) and got[-1] == 0.0
    positions = np.linspace(0, 10, 20)  # where each of the 20 falls on the table's 11 points
    left = np.minimum(positions.astype(int), 9)
    logs = np.log(AYS_SD1)
    expected = np.exp(logs[left] + (positions - left) * (logs[left + 1] - logs[left]))
    np.testing.assert_allclose(got[:-1], expected, rtol=1e-5)
    ten = sigmas("Align Your Steps", 10)  # A1111 at 10 steps: the 11 published sigmas interpolated to 10
    assert len(ten) == 11 and ten[0] == pytest.approx(14.615) and ten[-2] == pytest.approx(0.029)


def test_new_sigma_schedules_keep_the_schedule_through_a_config_copy_and_stay_torch_free_at_import():
    import subprocess
    import sys

    from brushwork.engine.samplers import build_scheduler
    from brushwork.models.load import scheduler_config

    a = build_scheduler(scheduler_config("eps"), "DPM++ 2M", "KL Optimal")
    b = type(a).from_config(a.config)  # what a pipeline copy does
    a.set_timesteps(5)
    b.set_timesteps(5)
    assert np.array_equal(np.asarray(a.sigmas), np.asarray(b.sigmas))
    assert build_scheduler(scheduler_config("eps"), "DPM++ 2M", "KL Optimal").__class__ is type(a)  # made once
    code = ("import sys; from brushwork.engine.samplers import SCHEDULE_TYPES, parse_sampler; "
            "parse_sampler('Euler', 'Align Your Steps'); print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.parametrize("schedule", ["Polyexponential", "KL Optimal", "Align Your Steps"])
def test_img2img_with_the_new_sigma_schedules(tiny, engine, monkeypatch, schedule):
    """strength < 1 starts part way down the schedule (the pipeline slices the timesteps): the steps taken are the
    schedule's last ones (a multistep sampler, which the pipeline starts with set_begin_index), and a second-order
    one (its timesteps in pairs) starts where it should."""
    from brushwork.engine import samplers
    from brushwork.models.load import scheduler_config

    build, taken = samplers.build_scheduler, []

    def spying(*args, **kwargs):
        scheduler = build(*args, **kwargs)
        step = scheduler.step

        def recording(*a, **kw):
            out = step(*a, **kw)
            taken.append(float(scheduler.sigmas[scheduler.step_index - 1]))  # the sigma this step started from
            return out

        scheduler.step = recording
        return scheduler

    monkeypatch.setattr(samplers, "build_scheduler", spying)
    for sampler in ("DPM++ 2M", "Heun"):
        taken.clear()
        result = engine.generate(req(tiny, mode=Mode.IMG2IMG, init_image=_init_image(), strength=0.5, steps=4,
                                     sampler=sampler, scheduler=schedule))
        assert px(result).std() > 1
        assert f"Sampler: {sampler}, Schedule type: {schedule}," in result.infotexts[0]
        assert "Denoising strength: 0.5" in result.infotexts[0]
        full = build(scheduler_config("eps"), sampler, schedule)
        full.set_timesteps(4)
        if sampler != "Heun":
            np.testing.assert_allclose(taken, np.asarray(full.sigmas)[2:4])  # 4 steps at 0.5: the last 2
        else:
            assert len(taken) == 3 and taken[0] == pytest.approx(float(full.sigmas[3]))  # 2 steps, 3 evaluations
