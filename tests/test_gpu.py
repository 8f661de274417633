"""On a real CUDA GPU: fp16/bf16 pictures against the CPU's fp32 one, the out-of-memory ladder with real
out-of-memory errors, and the offload modes really moving the weights.

Marked ``gpu`` and skipped without CUDA, so the normal suite stays green on a CPU machine. Run them there with

    pytest -m gpu tests/test_gpu.py          # benchmarks/gpu/run.sh does it on the lent device machine

The noise is drawn on the CPU (``RunContext.noise``, CPU generators for the samplers), so a seed gives the same
starting point on every device; what differs is only the arithmetic's precision.
"""

from __future__ import annotations

import dataclasses
import gc
import os

import numpy as np
import pytest
import torch

from brushwork import GenerationRequest

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")]

MiB = 2**20


def px(result, i=0):
    return np.asarray(result.images[i]).astype(int)


def diff(a, b) -> dict:
    d = np.abs(a - b)
    return {"mean": float(d.mean()), "p99": float(np.percentile(d, 99)), "max": int(d.max())}


def tiny_req(tiny, family="sd1", **kw):
    base = dict(prompt="a red circle on the left", model=str(tiny[family]["safetensors"]), steps=6, seed=1234,
                width=64, height=64, watermark=False, sampler="Euler",
                prediction="v" if family.startswith("sd2") else None)
    base.update(kw)
    return GenerationRequest(**base)


def _free():
    gc.collect()
    torch.cuda.empty_cache()


# ---- precision: the GPU's fp16 / bf16 picture against the CPU's fp32 one -------------------------------------------

# Measured on the CPU with the same tiny models (bf16 everywhere, latents too, against fp32; 6 steps):
# mean 0.8-1.8, p99 3-7, max <= 15 levels of 255. fp16 keeps 3 more mantissa bits than bf16.
LIMITS = {"fp16": {"mean": 1.5, "p99": 6}, "bf16": {"mean": 4.0, "p99": 16}}


@pytest.mark.parametrize("family,sampler", [("sd1", "Euler"), ("sd1", "Euler a"), ("sd1", "DPM++ 2M"),
                                            ("sd2", "Euler")])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_picture_is_close_to_the_cpu_fp32_picture(tiny, engine, family, sampler, precision):
    cpu = engine.generate(tiny_req(tiny, family, sampler=sampler, device="cpu", precision="fp32"))
    gpu = engine.generate(tiny_req(tiny, family, sampler=sampler, device="cuda", precision=precision))
    policy = engine._loaded.policy
    assert policy.device == "cuda" and policy.dtype_name == precision
    unet = engine._loaded.parts.unet
    assert next(unet.parameters()).device.type == "cuda" and unet.dtype == policy.dtype
    if policy.channels_last:  # brushwork's CUDA policy: NHWC convolutions for the tensor cores
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    other_seed = engine.generate(tiny_req(tiny, family, sampler=sampler, device="cuda", precision=precision,
                                          seed=99))
    close, far = diff(px(gpu), px(cpu)), diff(px(other_seed), px(cpu))
    print(f"{family} {sampler} {precision}: vs cpu fp32 {close}; another seed {far}")
    assert px(cpu).std() > 10  # a real picture, not a flat one
    assert close["mean"] <= LIMITS[precision]["mean"] and close["p99"] <= LIMITS[precision]["p99"], close
    assert far["mean"] > 5 * close["mean"] + 5  # the comparison can tell pictures apart
    assert not any("NaN" in n for n in gpu.notes), gpu.notes


def test_the_same_seed_gives_the_same_picture_on_the_gpu(tiny, engine):
    a = engine.generate(tiny_req(tiny, device="cuda", sampler="Euler a"))
    b = engine.generate(tiny_req(tiny, device="cuda", sampler="Euler a"))
    assert np.abs(px(a) - px(b)).max() <= 1


def test_auto_on_cuda_is_fp16_channels_last(tiny, engine):
    engine.generate(tiny_req(tiny, device="auto", steps=2))
    policy = engine._loaded.policy
    assert (policy.device, policy.dtype_name, policy.vae_dtype_name, policy.channels_last) == ("cuda", "fp16",
                                                                                               "fp16", True)


# ---- a model whose components are big enough for memory modes to matter ---------------------------------------------


def fat_components(wide: bool = True, seed: int = 0):
    """An SD 1.x-layout model with two big components and a small VAE: a 3-level UNet (320/640/1280, one layer
    per block: 316 M parameters, 632 MB in fp16) and a 24-layer CLIP text encoder of width 768 (208 M, 416 MB).
    All three on the GPU need about 1.05 GB, the largest alone 632 MB: a memory cap between the two lets model
    offload run where "high" runs out. ``wide=False`` is the same structure, narrow (to check it loads on a CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    channels, width = ((320, 640, 1280), 768) if wide else ((32, 64, 128), 32)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=24,
        num_attention_heads=max(1, width // 64), max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=width,
    ))
    with torch.no_grad():  # as tinymodels: no tensor left at its identity / zero init
        for model in (unet, vae, text_encoder):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return unet, vae, text_encoder


def save_fat(path, wide: bool = True):
    from brushwork.models.convert import save_single_file

    unet, vae, te = fat_components(wide)
    return save_single_file(path, unet=unet, vae=vae, text_encoder=te, dtype=torch.float16)


@pytest.fixture(scope="session")
def fat(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, min(16, os.cpu_count() or 1)))  # conftest's 1 thread: slow for 500 M
    try:
        return save_fat(tmp_path_factory.mktemp("fat") / "fat-sd1.safetensors")
    finally:
        torch.set_num_threads(threads)


def fat_req(path, **kw):
    base = dict(prompt="a red circle on the left", model=str(path), steps=3, seed=7, width=64, height=64,
                watermark=False, sampler="Euler", device="cuda", precision="fp16")
    base.update(kw)
    return GenerationRequest(**base)


def _bytes(module, device_type=None) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if device_type is None or p.device.type == device_type)


def _on_cuda(parts) -> dict:
    return {name: _bytes(m, "cuda") for name, m in parts.modules.items()}


def test_out_of_memory_ladder_with_a_real_memory_cap(fat, engine):
    """auto starts in high (the card has plenty free); under a cap below all weights together but above the
    largest component, high and medium really run out, and the run goes on in low with the same seed."""
    request = fat_req(fat, memory="auto")
    loaded, _ = engine.load(dataclasses.replace(request).validate())
    sizes = {name: _bytes(m) for name, m in loaded.parts.modules.items()}
    largest, total = max(sizes.values()), sum(sizes.values())
    assert total - largest > 300 * MiB, sizes  # a wide enough window for the cap
    _free()
    base = torch.cuda.memory_reserved()
    cap = base + largest + (total - largest) // 2
    card = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(cap / card)
    try:
        result = engine.generate(request)
        peak = torch.cuda.max_memory_reserved()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(f"sizes {sizes}, cap {(cap - base) / MiB:.0f} MiB over {base / MiB:.0f}, notes {result.notes}")
    assert len(result.notes) == 1, result.notes
    assert result.notes[0].startswith("out of memory in memory mode high; ran again in mode low"), result.notes
    assert loaded.memory_state.get("floor") == "low"
    assert peak <= cap
    _free()
    # without the cap, asking for low directly gives the same picture
    low = engine.generate(fat_req(fat, memory="low"))
    assert low.notes == []
    assert np.abs(px(low) - px(result)).max() <= 1


def _probe(module, record: dict, parts):
    """While ``module`` (a layer inside the UNet) runs: where each component's weights are, and GPU memory."""

    def hook(_module, _args):
        if "on_cuda" not in record:
            torch.cuda.synchronize()
            record["on_cuda"] = _on_cuda(parts)
            record["allocated"] = torch.cuda.memory_allocated()

    return module.register_forward_pre_hook(hook)


def test_offload_modes_move_the_weights(fat, engine):
    loaded, _ = engine.load(fat_req(fat, memory="low").validate())
    parts = loaded.parts
    sizes = {name: _bytes(m) for name, m in parts.modules.items()}
    pictures = {}
    for mode in ("low", "minimal", "high"):
        _free()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        record: dict = {}
        # a layer deep inside the UNet: under model offload the whole UNet is on the GPU by then (its own hook
        # ran when the UNet was called); under sequential offload only the layers that are running are
        handle = _probe(parts.unet.mid_block.resnets[0].conv1, record, parts)
        try:
            result = engine.generate(fat_req(fat, memory=mode))
        finally:
            handle.remove()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        after = _on_cuda(parts)
        pictures[mode] = px(result)
        print(f"{mode}: during the UNet {record['on_cuda']}, after {after}, peak {peak / MiB:.0f} MiB, "
              f"sizes {sizes}")
        during = record["on_cuda"]
        if mode == "low":  # model offload: one whole component at a time
            assert during["unet"] == sizes["unet"]
            assert during["text_encoder"] == 0
            assert peak < sizes["unet"] + sizes["text_encoder"]
            assert after["unet"] == 0 and after["text_encoder"] == 0  # the VAE may stay until the next call
        elif mode == "minimal":  # sequential offload: one layer at a time
            assert during["unet"] < sizes["unet"] * 0.1
            assert during["text_encoder"] == 0
            assert peak < sizes["unet"] * 0.5
            assert sum(after.values()) < sizes["unet"] * 0.1
        else:  # high: everything back on the GPU (the offload hooks removed, weights back from meta)
            assert during == sizes and after == sizes
            assert not any(p.device.type == "meta" for m in parts.modules.values() for p in m.parameters())
    for mode in ("low", "minimal"):
        d = diff(pictures[mode], pictures["high"])
        assert d["mean"] <= 1.0 and d["max"] <= 16, (mode, d)


def test_auto_on_a_full_card_starts_high(fat, engine):
    result = engine.generate(fat_req(fat, memory="auto"))
    assert not any("out of memory" in note for note in result.notes), result.notes
    assert all(v > 0 for v in _on_cuda(engine._loaded.parts).values())
