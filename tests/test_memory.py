"""Memory modes: the plan per mode, the out-of-memory ladder (OOM injected into the real UNet), tiled VAE decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brushwork import GenerationRequest, InvalidRequest
from brushwork.engine import memory
from brushwork.engine.device import DevicePolicy
from brushwork.engine.run import decode

CPU = DevicePolicy("cpu", "fp32", "fp32")
GPU = DevicePolicy("cuda", "fp16", "fp16")  # plans are pure data: no GPU needed to check them


def req(tiny, **kw):
    base = dict(prompt="a red circle on the left", model=str(tiny["sd1"]["safetensors"]), steps=3, seed=1234,
                width=32, height=32, watermark=False, batch_size=2)
    base.update(kw)
    return GenerationRequest(**base)


def px(result, i=0):
    return np.asarray(result.images[i]).astype(int)


def fail_unet(engine, request, times: int, error=None):
    """Make the engine's own UNet raise (out of memory by default) on its first ``times`` calls."""
    loaded, _ = engine.load(request.validate())
    calls = {"n": 0}

    def hook(_module, _args):
        calls["n"] += 1
        if calls["n"] <= times:
            raise error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return loaded, loaded.parts.unet.register_forward_pre_hook(hook), calls


def test_plans_map_modes_to_mechanisms():
    assert memory.plan("high", GPU, pixels=512 * 512) == memory.MemoryPlan("high")
    assert memory.plan("high", GPU, pixels=2048 * 2048).vae_tiling  # a huge image is tiled in any mode
    assert memory.plan("medium", GPU).mechanisms() == (False, True, True, None, None)
    assert memory.plan("low", GPU).offload == "model" and memory.plan("low", GPU).vae_tile == 512
    assert memory.plan("minimal", GPU).offload == "sequential" and memory.plan("minimal", GPU).attention_slicing
    assert memory.plan("minimal", GPU).vae_tile == 256  # bounded decode memory even at 512x512
    # on a CPU there is nothing to offload to: low and minimal are medium, and the ladder skips them
    assert memory.plan("minimal", CPU).mechanisms() == memory.plan("medium", CPU).mechanisms()
    assert [memory.next_mode(m, GPU) for m in memory.MODES] == ["medium", "low", "minimal", None]
    assert [memory.next_mode(m, CPU) for m in memory.MODES] == ["medium", None, None, None]
    with pytest.raises(InvalidRequest, match="unknown memory mode 'tiny'; choose one of: auto, high"):
        memory.plan("tiny", CPU)


def test_auto_mode_follows_free_gpu_memory(monkeypatch):
    gib = 2**30
    modules = {"unet": torch.nn.Linear(1024, 1024 * 256, bias=False),  # 1 GiB of fp32 weights
               "vae": torch.nn.Linear(1024, 1024 * 64, bias=False)}  # 256 MiB
    for free, expected in ((16 * gib, "high"), (5 * gib, "medium"), (int(3.1 * gib), "low"), (gib, "minimal")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * gib))
        got = memory.initial_mode("auto", GPU, modules, pixels=512 * 512, batch=4)
        assert got == expected, (free / gib, got)
    assert memory.initial_mode("auto", CPU, modules, pixels=512 * 512, batch=4) == "high"
    assert memory.initial_mode("auto", CPU, modules, pixels=512 * 512, batch=4, floor="medium") == "medium"
    assert memory.initial_mode("low", CPU, modules, pixels=512 * 512, batch=4, floor="medium") == "low"


def test_out_of_memory_in_auto_steps_down_and_makes_the_same_images(tiny, engine):
    medium = engine.generate(req(tiny, memory="medium"))
    high = engine.generate(req(tiny, memory="high"))
    _, handle, calls = fail_unet(engine, req(tiny), times=1)
    try:
        result = engine.generate(req(tiny))
    finally:
        handle.remove()
    assert calls["n"] > 1  # the first UNet call failed, and the run went on
    assert len(result.notes) == 1 and result.notes[0].startswith("out of memory in memory mode high; ")
    assert "mode medium" in result.notes[0]
    assert result.seeds == medium.seeds
    for i in range(2):
        assert np.array_equal(px(result, i), px(medium, i))
    # the next request starts in the mode that worked, without running out first
    again = engine.generate(req(tiny))
    assert again.notes == [] and np.array_equal(px(again), px(medium))
    assert engine._loaded.parts.vae.use_slicing
    # an explicit mode is not limited by that, and everything medium switched on is off again
    high_again = engine.generate(req(tiny, memory="high"))
    assert not engine._loaded.parts.vae.use_slicing and not engine._loaded.parts.vae.use_tiling
    assert np.array_equal(px(high_again), px(high))


def test_out_of_memory_in_an_explicit_mode_is_one_clear_error(tiny, engine):
    _, handle, calls = fail_unet(engine, req(tiny, memory="high"), times=1)
    try:
        with pytest.raises(InvalidRequest, match="out of memory in memory mode high; try --memory medium or"):
            engine.generate(req(tiny, memory="high"))
    finally:
        handle.remove()
    assert calls["n"] == 1  # no retry when the user chose the mode


def test_out_of_memory_at_the_bottom_of_the_ladder_is_an_error(tiny, engine):
    _, handle, calls = fail_unet(engine, req(tiny), times=100)
    try:
        with pytest.raises(InvalidRequest, match="out of memory in memory mode medium; try a smaller size"):
            engine.generate(req(tiny))
    finally:
        handle.remove()
    assert calls["n"] == 2  # high, then medium (on a CPU low and minimal change nothing)


def test_other_errors_are_not_retried(tiny, engine):
    _, handle, calls = fail_unet(engine, req(tiny), times=1, error=ValueError("a bug"))
    try:
        with pytest.raises(ValueError, match="a bug"):
            engine.generate(req(tiny))
    finally:
        handle.remove()
    assert calls["n"] == 1


def test_cpu_allocation_failures_count_as_out_of_memory():
    assert memory.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                      "memory: you tried to allocate 68719476736 bytes."))
    assert memory.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert not memory.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def _tiled_vae():
    from tinymodels import build_components

    _, vae, _ = build_components("sd1", seed=3)
    vae.eval()
    # a 64-pixel native tile (the real SD VAE's is 512): a 256x192 image is 5x4 overlapping tiles
    vae.tile_sample_min_size = 64
    vae.tile_latent_min_size = 32
    return vae


def test_tiled_decode_of_a_large_image_matches_the_untiled_one_without_seams():
    vae = _tiled_vae()
    generator = torch.Generator().manual_seed(0)
    # smooth latents, like a real picture's, so that a seam would stand out
    latents = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 16, generator=generator), size=(96, 128),
                                              mode="bicubic", align_corners=False)
    (whole,), _ = decode(vae, latents)
    vae.enable_tiling()
    calls = {"n": 0}
    handle = vae.decoder.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        (tiled,), _ = decode(vae, latents)
    finally:
        handle.remove()
        vae.disable_tiling()
    assert calls["n"] > 1 and tiled.size == whole.size == (256, 192)  # really decoded in tiles
    a, b = np.asarray(whole).astype(float), np.asarray(tiled).astype(float)
    # the same picture; not bit-equal, since each tile normalises its own features (GroupNorm)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9

    # seams: where tiles meet (every 48 pixels: 64-pixel tiles blended over 16), the jump between
    # neighbouring columns/rows is no larger than in the untiled image (unblended tiles: 5x larger)
    stride = vae.tile_sample_min_size - int(vae.tile_sample_min_size * vae.tile_overlap_factor)

    def jumps(img, axis):
        return np.abs(np.diff(img, axis=axis)).mean(axis=tuple(i for i in range(3) if i != axis))

    for axis, size in ((1, 256), (0, 192)):
        seams = [x - 1 for x in range(stride, size, stride)]
        assert jumps(b, axis)[seams].mean() < jumps(a, axis)[seams].mean() * 1.5, axis


def test_out_of_memory_in_the_vae_decode_steps_down_too(tiny, engine):
    medium = engine.generate(req(tiny, memory="medium", batch_size=1))
    loaded, _ = engine.load(req(tiny, batch_size=1).validate())
    calls = {"n": 0}

    def hook(_module, _args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    handle = loaded.parts.vae.decoder.register_forward_pre_hook(hook)
    try:
        result = engine.generate(req(tiny, batch_size=1))
    finally:
        handle.remove()
    assert len(result.notes) == 1 and "ran again in mode medium with the same seeds" in result.notes[0]
    assert np.array_equal(px(result), px(medium))
