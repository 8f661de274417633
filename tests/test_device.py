"""Device and dtype policy: the automatic CPU choice, the bf16 mixed path, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brushwork import GenerationRequest, InvalidRequest
from brushwork.engine import device as device_mod

SD15_UNET_PARAMS = 859_520_964


def req(tiny, **kw):
    base = dict(prompt="a red circle on the left", model=str(tiny["sd1"]["safetensors"]), steps=3, seed=1234,
                width=32, height=32, watermark=False)
    base.update(kw)
    return GenerationRequest(**base)


def test_cpu_auto_is_bf16_only_for_large_models_on_cpus_with_native_bf16(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    big = device_mod.choose("cpu", "auto", unet_params=SD15_UNET_PARAMS)
    assert (big.dtype, big.vae_dtype, big.latent_dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert big.mixed and big.channels_last and "native bf16" in big.why
    small = device_mod.choose("cpu", "auto", unet_params=2_000_000)
    assert small.dtype == small.latent_dtype == torch.float32 and not small.mixed
    assert device_mod.choose("cpu", "auto").dtype == torch.float32  # size unknown: fp32
    assert device_mod.choose("cpu", "fp32", unet_params=SD15_UNET_PARAMS).dtype == torch.float32
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert device_mod.choose("cpu", "auto", unet_params=SD15_UNET_PARAMS).dtype == torch.float32
    # asked for explicitly, bf16 is used on any CPU, with fp32 latents
    assert device_mod.choose("cpu", "bf16").latent_dtype == torch.float32


def test_half_precision_is_never_used_on_a_cpu():
    with pytest.raises(InvalidRequest, match="fp16.*does not run on a CPU"):
        device_mod.choose("cpu", "fp16")
    for params in (None, 10, SD15_UNET_PARAMS):
        assert device_mod.choose("cpu", "auto", unet_params=params).dtype != torch.float16


def test_unknown_devices_and_precisions_name_the_choices():
    with pytest.raises(InvalidRequest, match="unknown device 'tpu'; choose auto, cpu"):
        device_mod.choose("tpu")
    with pytest.raises(InvalidRequest, match="unknown precision 'fp8'; choose one of: auto, fp32"):
        device_mod.choose("cpu", "fp8")


def test_native_bf16_detection_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(device_mod, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert not device_mod.cpu_has_native_bf16()
    monkeypatch.setattr(device_mod, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert device_mod.cpu_has_native_bf16() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_tiny_models_stay_fp32_in_auto(tiny, engine):
    loaded, _ = engine.load(req(tiny).validate())
    assert loaded.policy.dtype == torch.float32
    assert all(p.dtype == torch.float32 for m in loaded.parts.modules.values() for p in m.parameters())


def test_bf16_computes_inside_the_unet_and_keeps_fp32_latents(tiny, engine):
    fp32 = engine.generate(req(tiny, precision="fp32", sampler="Euler"))
    loaded, _ = engine.load(req(tiny, precision="bf16", sampler="Euler").validate())
    assert loaded.parts.unet.dtype == torch.bfloat16 and loaded.parts.text_encoder.dtype == torch.float32
    seen = {}

    def outside(_module, args, kwargs):  # runs before the policy's cast: what the pipeline hands the UNet
        seen["sample"], seen["timestep"] = args[0].dtype, args[1].dtype

    def inside(_module, args, kwargs):  # after the cast: what the UNet computes with
        seen["inner"] = args[0].dtype

    def result(_module, _args, output):
        seen["out"] = output[0].dtype

    handles = [loaded.parts.unet.register_forward_pre_hook(outside, with_kwargs=True, prepend=True),
               loaded.parts.unet.register_forward_pre_hook(inside, with_kwargs=True),
               loaded.parts.unet.register_forward_hook(result)]
    try:
        bf16 = engine.generate(req(tiny, precision="bf16", sampler="Euler"))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"sample": torch.float32, "timestep": torch.float32, "inner": torch.bfloat16,
                    "out": torch.float32}
    # close to fp32 (out of 255), but really computed differently
    diff = np.abs(np.asarray(bf16.images[0]).astype(int) - np.asarray(fp32.images[0]).astype(int))
    assert 0 < diff.mean() < 6, diff.mean()


def test_fast_mode_reuses_deep_features_and_stays_close(tiny, engine):
    plain = engine.generate(req(tiny, steps=6, sampler="Euler"))
    loaded, _ = engine.load(req(tiny, steps=6).validate())
    calls = {"unet": 0, "mid": 0}
    handles = [loaded.parts.unet.register_forward_pre_hook(lambda *_: calls.__setitem__("unet", calls["unet"] + 1)),
               loaded.parts.unet.mid_block.resnets[0].register_forward_pre_hook(  # really computed
                   lambda *_: calls.__setitem__("mid", calls["mid"] + 1))]
    try:
        fast = engine.generate(req(tiny, steps=6, sampler="Euler", fast=True))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"unet": 6, "mid": 2}  # deep blocks at steps 1 and 4 only
    assert any("fast mode" in note for note in fast.notes) and not plain.notes
    diff = np.abs(np.asarray(fast.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int))
    assert 0 < diff.mean() < 20, diff.mean()
    # the UNet is whole again afterwards
    assert np.array_equal(np.asarray(engine.generate(req(tiny, steps=6, sampler="Euler")).images[0]),
                          np.asarray(plain.images[0]))
    with pytest.raises(InvalidRequest, match="fast mode interval must be a whole number"):
        engine.generate(req(tiny, fast="very"))


def test_compile_and_threads_settings_reach_the_loaded_model(tiny, tmp_path, monkeypatch):
    from brushwork.engine.core import Engine
    from brushwork.settings import Settings

    monkeypatch.setenv("BRUSHWORK_COMPILE", "yes")
    monkeypatch.setenv("BRUSHWORK_THREADS", "1")
    settings = Settings.load(home=tmp_path)
    assert settings.compile is True and settings.threads == 1
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__))
    loaded, _ = Engine(settings).load(req(tiny).validate())
    assert loaded.policy.compile and compiled == ["UNet2DConditionModel"]
    assert torch.get_num_threads() == 1
    assert device_mod.choose("cpu", "fp32").compile is False


def test_cpu_threads_never_exceed_a_containers_quota(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    assert device_mod.cpu_threads(64, cgroup=str(v2)) == 2
    (v2 / "cpu.max").write_text("max 100000\n")  # no quota: torch's own default stands (within the affinity)
    assert device_mod.cpu_threads(1, cgroup=str(v2)) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert device_mod.cpu_threads(64, cgroup=str(v1)) == 1
    import os

    assert device_mod.cpu_threads(64, cgroup=str(tmp_path / "none")) == min(64, len(os.sched_getaffinity(0)))


def test_token_merging_matching_merges_alike_tokens_and_puts_them_back():
    from brushwork.engine.tome import _matching

    torch.manual_seed(0)
    cells = torch.randn(2, 4, 4, 8)  # one value per 2x2 cell of an 8x8 grid: every source equals a destination
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 8)
    merge, unmerge = _matching(x, 8, 8, r=48, turn=1)
    merged = merge(x)
    assert merged.shape == (2, 16, 8)  # 48 of 64 tokens merged away
    assert torch.allclose(unmerge(merged), x, atol=1e-6)
    noisy = torch.randn(2, 64, 8)
    merge, unmerge = _matching(noisy, 8, 8, r=0, turn=0)
    assert torch.equal(unmerge(merge(noisy)), noisy)


def test_token_merging_shrinks_full_resolution_self_attention_and_is_in_the_parameters(tiny, engine):
    from brushwork.output.infotext import request_from_infotext

    plain = engine.generate(req(tiny, steps=4, sampler="Euler"))
    loaded, _ = engine.load(req(tiny).validate())
    block = next(m for m in loaded.parts.unet.down_blocks[0].modules() if type(m).__name__ == "BasicTransformerBlock")
    seen = []
    handle = block.attn1.to_q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        merged = engine.generate(req(tiny, steps=4, sampler="Euler", token_merging_ratio=0.5))
    finally:
        handle.remove()
    assert seen and set(seen) == {128}  # 32x32 pixels -> 16x16 latents = 256 tokens, half merged away
    diff = np.abs(np.asarray(merged.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int))
    assert 0 < diff.mean() < 20, diff.mean()
    assert "Token merging ratio: 0.5" in merged.infotexts[0]
    assert request_from_infotext(merged.infotexts[0])["token_merging_ratio"] == 0.5
    # the UNet is whole again afterwards
    assert np.array_equal(np.asarray(engine.generate(req(tiny, steps=4, sampler="Euler")).images[0]),
                          np.asarray(plain.images[0]))
    with pytest.raises(InvalidRequest, match="token merging ratio must be between 0"):
        engine.generate(req(tiny, token_merging_ratio=0.95))
