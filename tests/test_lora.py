"""LoRAs (issue 15): ``<lora:name:0.8>`` tags applied as A1111 applies them, through diffusers' LoRA loading, on the
cached model for one request only.

The LoRAs are tiny random ones written here from the tiny SD 1.x model's own module names, in the kohya layout
(``lora_unet_*`` / ``lora_te_*`` with ``.alpha``: what A1111 users download) and the diffusers/peft layout.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from brushwork import GenerationRequest
from brushwork.errors import InvalidRequest, ModelError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SIZE, STEPS, SEED = 32, 3, 7


def kohya_lora(parts, *, seed: int = 1, rank: int = 4, alpha: float = 2.0, te: bool = True, models=None) -> dict:
    """A random LoRA in kohya's layout for this model: ``lora_unet_<module path with _>.lora_down/up.weight`` and
    ``.alpha``, for the attention layers of the UNet and (``te``) of the text encoder; ``models``: [(prefix,
    model)] instead (SDXL's lora_te1_ / lora_te2_)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    models = models or [("lora_unet_", parts.unet)] + ([("lora_te_", parts.text_encoder)] if te else [])
    modules = [(prefix, n, m) for prefix, model in models for n, m in model.named_modules()
               if n.endswith(UNET_TARGETS if prefix == "lora_unet_" else TE_TARGETS)]
    for prefix, name, module in modules:
        key = prefix + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down, up = (rank, module.in_features), (module.out_features, rank)
        else:  # SD 1.x's proj_in / proj_out: 1x1 convolutions
            down, up = (rank, module.in_channels, 1, 1), (module.out_channels, rank, 1, 1)
        state[f"{key}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
        state[f"{key}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def peft_lora(parts, *, seed: int = 2, rank: int = 4) -> dict:
    """A random LoRA in the diffusers/peft layout (``unet.<module>.lora_A.weight``, ``text_encoder.<module>...``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model, targets in (("unet", parts.unet, ("to_q", "to_k", "to_v", "to_out.0")),
                                   ("text_encoder", parts.text_encoder, TE_TARGETS)):
        for name, module in model.named_modules():
            if name.endswith(targets) and isinstance(module, torch.nn.Linear):
                state[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.3
                state[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.3
    return state


def lycoris_lora(parts, kind: str, *, seed: int = 3, rank: int = 2, alpha: float = 2.0) -> dict:
    """A random LyCORIS LoHa or LoKr file in kohya's layout for the attention projections (32 x 32) of the UNet
    and the text encoder."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model, targets in (("lora_unet_", parts.unet, ("to_q", "to_v")), ("lora_te_", parts.text_encoder,
                                                                                  ("q_proj", "out_proj"))):
        for name, module in model.named_modules():
            if not (name.endswith(targets) and isinstance(module, torch.nn.Linear)):
                continue
            out, inp = module.out_features, module.in_features
            key = prefix + name.replace(".", "_")
            if kind == "LoHa":
                for w in ("w1", "w2"):
                    state[f"{key}.hada_{w}_a"] = torch.randn(out, rank, generator=g) * 0.7
                    state[f"{key}.hada_{w}_b"] = torch.randn(rank, inp, generator=g) * 0.7
            else:  # LoKr: a full 4x4 factor, and one of (out/4) x (in/4) decomposed at this rank
                state[f"{key}.lokr_w1"] = torch.randn(4, 4, generator=g) * 0.7
                state[f"{key}.lokr_w2_a"] = torch.randn(out // 4, rank, generator=g) * 0.7
                state[f"{key}.lokr_w2_b"] = torch.randn(rank, inp // 4, generator=g) * 0.7
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def lycoris_difference(state: dict, key: str) -> torch.Tensor:
    """LyCORIS's weight difference of one module, re-stated: LoHa (w1a w1b) * (w2a w2b), LoKr kron(w1, w2a w2b),
    each times alpha / rank."""
    if f"{key}.hada_w1_a" in state:
        w = {n: state[f"{key}.hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        return (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * state[f"{key}.alpha"] / w["w1_b"].shape[0]
    w2_b = state[f"{key}.lokr_w2_b"]
    return torch.kron(state[f"{key}.lokr_w1"], state[f"{key}.lokr_w2_a"] @ w2_b) * state[f"{key}.alpha"] / w2_b.shape[0]


NO_RANK_KINDS = ("(IA)^3", "OFT", "full", "norm")  # LyCORIS kinds with no rank: no alpha / rank scale


def name_of(kind: str) -> str:
    """The test file's name for a kind."""
    return {"(IA)^3": "ia3"}.get(kind, kind.lower())


def lycoris_no_rank(parts, kind: str, *, seed: int = 4) -> dict:
    """A random LyCORIS file of one of NO_RANK_KINDS in kohya's layout, for layers of the UNet and the text encoder:
    (IA)^3 ``weight`` per output channel (``on_input`` false) and per input channel (the feed-forward outputs,
    ``on_input`` true); OFT ``oft_blocks`` with alpha, the constraint (UNet), and ``oft_diag``, the rotations
    themselves (text encoder), in blocks of a quarter of the outputs; full ``diff`` with ``diff_b`` where the layer
    has a bias (Linear, 1x1 and 3x3 convolutions); norm ``w_norm`` / ``b_norm`` (LayerNorm, GroupNorm). The text
    encoder's keys are kohya's, ``lora_te_text_model_encoder_...``, whether or not transformers' CLIP has that
    ``text_model`` level."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model in (("lora_unet_", parts.unet), ("lora_te_", parts.text_encoder)):
        for name, layer in model.named_modules():
            path = name if prefix == "lora_unet_" or name.startswith("text_model.") else "text_model." + name
            key = prefix + path.replace(".", "_")
            if kind == "(IA)^3" and name.endswith(("to_k", "to_v", "k_proj", "v_proj", "ff.net.2", "fc2")):
                on_input = name.endswith(("ff.net.2", "fc2"))
                state[f"{key}.weight"] = torch.randn(layer.weight.shape[int(on_input)], generator=g)
                state[f"{key}.on_input"] = torch.tensor(on_input)
            elif kind == "OFT" and name.endswith(("to_q", "to_out.0", "proj_out", "q_proj", "out_proj")):
                size = layer.weight.shape[0] // 4
                if prefix == "lora_unet_":
                    state[f"{key}.oft_blocks"] = torch.randn(4, size, size, generator=g) * 0.3
                    state[f"{key}.alpha"] = torch.tensor(0.05)  # |Q| at most 0.05 * outputs: clamps most layers
                else:
                    state[f"{key}.oft_diag"] = torch.linalg.qr(torch.randn(4, size, size, generator=g))[0].contiguous()
            elif kind == "full" and name.endswith(("to_q", "proj_in", "resnets.0.conv1", "q_proj")):
                state[f"{key}.diff"] = torch.randn(layer.weight.shape, generator=g) * 0.2
                if layer.bias is not None:
                    state[f"{key}.diff_b"] = torch.randn(layer.weight.shape[0], generator=g) * 0.2
            elif kind == "norm" and name.endswith(("transformer_blocks.0.norm1", "resnets.0.norm1", "layer_norm1")):
                state[f"{key}.w_norm"] = torch.randn(layer.weight.shape, generator=g) * 0.5
                state[f"{key}.b_norm"] = torch.randn(layer.weight.shape, generator=g) * 0.5
    return state


def merged_copy(layer, tensors: dict, strength: float):
    """A copy of the layer with the LyCORIS module's difference merged into its weight (and bias) at ``strength``,
    re-stated from the kinds' definitions: (IA)^3 W * (1 + s w) along the outputs (or inputs); OFT each block of
    outputs rotated, W' = blockdiag(R)^T W, R = (I - Q)^-1 (I + Q) from the skew-symmetric Q = B - B^T whose norm
    is clamped to alpha * outputs (oft_diag: R as stored), W + s (W' - W); full and norm W + s diff, b + s diff_b."""
    import copy

    merged = copy.deepcopy(layer)
    w, b = merged.weight, merged.bias
    with torch.no_grad():
        if "weight" in tensors:
            factor = 1 + strength * tensors["weight"]
            w.mul_(factor[None, :] if tensors["on_input"] else factor[:, None])
        elif "oft_blocks" in tensors or "oft_diag" in tensors:
            if "oft_diag" in tensors:
                rotations = tensors["oft_diag"]
            else:
                q = tensors["oft_blocks"] - tensors["oft_blocks"].transpose(1, 2)
                q = q * min(1.0, float(tensors["alpha"]) * w.shape[0] / float(q.norm()))
                eye = torch.eye(q.shape[1]).expand_as(q)
                rotations = torch.linalg.solve(eye - q, eye + q)
            rotated = (torch.block_diag(*rotations).T @ w.flatten(1)).reshape(w.shape)
            w.add_(strength * (rotated - w))
        else:
            w.add_(strength * tensors["diff" if "diff" in tensors else "w_norm"].reshape(w.shape))
            bias = tensors.get("diff_b", tensors.get("b_norm"))
            if bias is not None:
                b.add_(strength * bias)
    return merged


def a1111_lora_hash(path) -> str:
    """A1111's (kohya's "addnet") hash, re-stated: sha256 of the bytes after the safetensors header, 12 hex."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


@pytest.fixture(scope="module")
def sd1(tiny):
    from brushwork.models.load import load_single_file

    return load_single_file(tiny["sd1"]["safetensors"])


@pytest.fixture(scope="module")
def library(tiny, sd1, tmp_path_factory):
    """A library: the tiny model, and in lora/ a kohya LoRA (alias "stylish"), another kohya one, a peft one."""
    root = tmp_path_factory.mktemp("lora-library")
    models = root / "models"
    (models / "lora" / "more").mkdir(parents=True)
    shutil.copyfile(tiny["sd1"]["safetensors"], models / "tiny.safetensors")
    save_file(kohya_lora(sd1), models / "lora" / "style.safetensors", metadata={"ss_output_name": "stylish"})
    save_file(kohya_lora(sd1, seed=5, rank=2, alpha=1.0), models / "lora" / "more" / "second.safetensors")
    save_file(peft_lora(sd1), models / "lora" / "peft-style.safetensors")
    return root


def engine_for(library, home: str = "home"):
    from brushwork import Engine, Settings

    return Engine(Settings(home=library / home, models_dir=library / "models"))


@pytest.fixture(scope="module")
def eng(library):
    return engine_for(library)


def draw(engine, prompt: str, **kw):
    result = engine.generate(GenerationRequest(prompt=prompt, model="tiny", sampler="Euler", steps=STEPS, seed=SEED,
                                               width=SIZE, height=SIZE, watermark=False, **kw))
    return np.asarray(result.images[0]).astype(int), result


@pytest.fixture(scope="module")
def base(eng):
    return draw(eng, "a red circle")[0]


# ---- the tags ----------------------------------------------------------------------------------------------


def test_tags_are_read_as_a1111_reads_them():
    from brushwork.engine.networks import LoraTag, lora_tags
    from brushwork.engine.prompts import strip_extra_networks

    tags, other = lora_tags("a <lora:a> b <lora:b:0.8>, <lora:c:0.5:1.2> <lyco:d:te=0.3:unet=0.9> <hypernet:h:1>")
    assert tags == [LoraTag("a", 1.0, 1.0), LoraTag("b", 0.8, 0.8), LoraTag("c", 0.5, 1.2), LoraTag("d", 0.3, 0.9)]
    assert other == ["hypernet"]
    assert strip_extra_networks("a cat <lora:x:1>, (red:1.2) <lora:y:0.5>") == "a cat , (red:1.2) "
    assert strip_extra_networks("a < b, <not a tag>, <lora:>, x:y>") == "a < b, <not a tag>, <lora:>, x:y>"
    with pytest.raises(InvalidRequest, match="strength 'lots', which is not a number"):
        lora_tags("<lora:a:lots>")
    with pytest.raises(InvalidRequest, match="names no LoRA"):
        lora_tags("<lora::1>")


def test_the_tag_scanner_is_linear_on_hostile_prompts():
    import time

    from brushwork.engine.prompts import extra_network_spans, strip_extra_networks

    for text in ("<a:" * 20000, "<" + "a" * 60000, "<a:b" * 15000 + ">"):
        started = time.perf_counter()
        strip_extra_networks(text)
        assert time.perf_counter() - started < 1.0
    assert len(list(extra_network_spans("<a:b" * 3 + ">"))) == 1  # "[^>]+" runs to the first ">", as A1111's


# ---- the library -------------------------------------------------------------------------------------------


def test_the_library_finds_loras_by_file_name_alias_and_hash(library, eng):
    lib = eng.loras
    assert [f.name for f in lib.files()] == ["peft-style", "second", "style"]
    style = lib.find("style")
    assert style.alias == "stylish" and lib.find("stylish") is style and lib.find("STYLE") is style
    assert lib.find("more/second") is None and lib.find("second").path.parent.name == "more"
    assert lib.hash(style)[:12] == a1111_lora_hash(style.path) == style.shorthash
    assert lib.by_hash(style.shorthash) is style and lib.by_hash("0" * 12) is None
    names = [e.name for e in eng.list_models()]
    assert "style" not in names and "second" not in names  # never listed as checkpoints


def test_a_shared_alias_finds_neither_file_and_the_metadata_hash_is_taken_when_it_is_hex(tmp_path):
    from brushwork.models.loras import LoraLibrary
    from brushwork.models.store import ModelStore
    from brushwork.settings import Settings

    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    t = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}
    save_file(t, folder / "a.safetensors", metadata={"ss_output_name": "same", "sshs_model_hash": "ab" * 32})
    save_file(t, folder / "b.safetensors", metadata={"ss_output_name": "same", "sshs_model_hash": "<img src=x>"})
    lib = LoraLibrary(ModelStore(Settings(home=tmp_path / "home", models_dir=tmp_path / "models")))
    assert lib.find("same") is None and lib.find("a").alias == "same"
    assert lib.hash(lib.find("a")) == "ab" * 32  # A1111 takes sshs_model_hash as given ...
    assert lib.hash(lib.find("b"))[:12] == a1111_lora_hash(folder / "b.safetensors")  # ... here only when it is hex


# ---- applying them -----------------------------------------------------------------------------------------


def test_a_kohya_lora_changes_the_picture_for_its_request_only(library, eng, base):
    with_lora, result = draw(eng, "a red circle <lora:style:1>")
    assert np.abs(with_lora - base).max() > 10
    after, _ = draw(eng, "a red circle")
    assert np.array_equal(after, base)  # no leak into the next request
    fresh, _ = draw(engine_for(library, "fresh-home"), "a red circle")
    assert np.array_equal(fresh, base)  # the cached model is exactly a freshly loaded one
    zero, _ = draw(eng, "a red circle <lora:stylish:0>")
    assert np.array_equal(zero, base)
    text = result.infotexts[0]
    assert text.startswith("a red circle <lora:style:1>\n")  # the infotext's prompt keeps the tag
    assert f'Lora hashes: "style: {a1111_lora_hash(library / "models/lora/style.safetensors")}"' in text


def test_a_kohya_lora_is_its_merged_weights_at_the_tags_strengths(tiny, eng, sd1):
    """The reference is plain diffusers on the model with W + strength * alpha / rank * up @ down merged in: the
    kohya layout, alpha and the text encoder / UNet strengths mean what A1111 makes of them."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from brushwork.models.load import load_single_file

    mine, _ = draw(eng, "a red circle <lora:style:0.5:0.8>")
    parts = load_single_file(tiny["sd1"]["safetensors"])
    state, rank = kohya_lora(sd1), 4
    with torch.no_grad():
        for prefix, model, strength in (("lora_unet_", parts.unet, 0.8), ("lora_te_", parts.text_encoder, 0.5)):
            for name, module in model.named_modules():
                key = prefix + name.replace(".", "_")
                if f"{key}.lora_down.weight" in state:
                    down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
                    delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
                    module.weight += strength * state[f"{key}.alpha"] / rank * delta
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=EulerDiscreteScheduler.from_config(parts.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs = _plain(pipe)
    assert np.abs(mine - theirs).max() <= 3  # merged and unmerged weights round differently


def _plain(pipe, prompt: str = "a red circle"):
    pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = torch.randn((1, 4, SIZE // factor, SIZE // factor), generator=torch.Generator("cpu").manual_seed(SEED))
    with torch.inference_mode():
        image = pipe(prompt=prompt, negative_prompt="", num_inference_steps=STEPS, guidance_scale=7.0,
                     latents=latents, height=SIZE, width=SIZE).images[0]
    return np.asarray(image).astype(int)


def test_peft_and_kohya_loras_together_give_plain_diffusers_picture(tiny, library, eng, base):
    """Plain diffusers, loading the same two files itself and setting the same strengths, draws the same picture."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from brushwork.models.load import load_single_file

    peft_only, _ = draw(eng, "a red circle <lora:peft-style:0.6>")
    both, _ = draw(eng, "a red circle <lora:peft-style:0.6> <lora:second:0.9>")
    assert np.abs(peft_only - base).max() > 10 and np.abs(both - peft_only).max() > 10
    parts = load_single_file(tiny["sd1"]["safetensors"])
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=EulerDiscreteScheduler.from_config(parts.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(library / "models/lora/peft-style.safetensors"), adapter_name="p")
    pipe.set_adapters(["p"], [0.6])
    assert np.array_equal(_plain(pipe), peft_only)
    pipe.load_lora_weights(str(library / "models/lora/more/second.safetensors"), adapter_name="s")
    pipe.set_adapters(["p", "s"], [0.6, 0.9])
    assert np.array_equal(_plain(pipe), both)


def test_ldm_named_kohya_keys_are_the_same_lora(library, eng, sd1, base):
    """Some trainers name the UNet's layers as the original checkpoint does (input_blocks_1_1 is diffusers'
    down_blocks.0.attentions.0 for one layer a block); diffusers maps them from the UNet's config."""
    state = {k: v for k, v in kohya_lora(sd1, te=False).items() if "down_blocks_0_attentions_0_proj_in" in k}
    folder = library / "models" / "lora"
    save_file(state, folder / "named-diffusers.safetensors")
    save_file({k.replace("down_blocks_0_attentions_0", "input_blocks_1_1"): v for k, v in state.items()},
              folder / "named-ldm.safetensors")
    try:
        diffusers_named, _ = draw(eng, "a red circle <lora:named-diffusers:1>")
        ldm_named, _ = draw(eng, "a red circle <lora:named-ldm:1>")
    finally:
        (folder / "named-diffusers.safetensors").unlink()
        (folder / "named-ldm.safetensors").unlink()
    assert np.abs(diffusers_named - base).max() > 0 and np.array_equal(ldm_named, diffusers_named)


def test_text_encoder_and_unet_strengths_apply_apart(eng, base):
    te_only, _ = draw(eng, "a red circle <lora:style:1:0>")
    unet_only, _ = draw(eng, "a red circle <lora:style:te=0:unet=1>")
    assert np.abs(te_only - base).max() > 0 and np.abs(unet_only - base).max() > 0
    assert np.abs(te_only - unet_only).max() > 0


def test_the_hires_prompt_brings_its_own_loras_for_the_second_pass(eng, base):
    hires = dict(hires_scale=2.0, hires_steps=2, hires_strength=0.5)
    same, _ = draw(eng, "a red circle <lora:style:1>", **hires)
    own, result = draw(eng, "a red circle <lora:style:1>", hires_prompt="a red circle <lora:second:1>", **hires)
    assert same.shape == (2 * SIZE, 2 * SIZE, 3) and np.abs(own - same).max() > 0
    assert 'Lora hashes: "style: ' in result.infotexts[0] and ", second: " in result.infotexts[0]
    assert np.array_equal(draw(eng, "a red circle")[0], base)


def test_switching_loras_loads_no_checkpoint_again(library, monkeypatch):
    engine = engine_for(library, "count-home")
    calls = []
    original = engine._load_parts
    monkeypatch.setattr(engine, "_load_parts", lambda *a, **k: calls.append(1) or original(*a, **k))
    for prompt in ("a cat <lora:style:1>", "a cat <lora:second:1>", "a cat", "a cat <lora:style:0.5>"):
        draw(engine, prompt)
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_lycoris_loha_and_lokr_are_their_merged_weights_and_leave_no_trace(tiny, library, eng, sd1, base, kind):
    """Diffusers refuses these; brushwork's own applier (engine/lycoris.py, forward hooks) must give the picture
    of the model with the difference LyCORIS defines merged in, and take it off again exactly."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from brushwork.models.load import load_single_file

    state = lycoris_lora(sd1, kind)
    path = library / "models" / "lora" / f"{kind.lower()}.safetensors"
    save_file(state, path)
    try:
        mine, result = draw(eng, f"a red circle <lora:{kind.lower()}:0.7:0.9>")
        assert np.abs(mine - base).max() > 10
        assert np.array_equal(draw(eng, "a red circle")[0], base)
        assert np.array_equal(draw(eng, f"a red circle <lora:{kind.lower()}:0>")[0], base)
        assert f"Lora hashes: \"{kind.lower()}: {a1111_lora_hash(path)}\"" in result.infotexts[0]
        both, _ = draw(eng, f"a red circle <lora:{kind.lower()}:0.7:0.9> <lora:peft-style:0.5>")
        assert np.abs(both - mine).max() > 0  # with a diffusers-loaded LoRA at once
        assert np.array_equal(draw(eng, "a red circle")[0], base)
    finally:
        path.unlink()
    parts = load_single_file(tiny["sd1"]["safetensors"])
    with torch.no_grad():
        for prefix, model, strength in (("lora_unet_", parts.unet, 0.9), ("lora_te_", parts.text_encoder, 0.7)):
            for name, module in model.named_modules():
                key = prefix + name.replace(".", "_")
                if f"{key}.alpha" in state:
                    module.weight += strength * lycoris_difference(state, key)
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=EulerDiscreteScheduler.from_config(parts.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    assert np.abs(mine - _plain(pipe)).max() <= 3


@pytest.mark.parametrize("kind", NO_RANK_KINDS)
def test_lycoris_ia3_oft_full_and_norm_files_change_their_request_only(library, eng, sd1, base, kind):
    name = name_of(kind)
    path = library / "models" / "lora" / f"{name}.safetensors"
    save_file(lycoris_no_rank(sd1, kind), path)
    try:
        assert np.array_equal(draw(eng, f"a red circle <lora:{name}:0>")[0], base)
        changed, _ = draw(eng, f"a red circle <lora:{name}:1>")
        assert np.abs(changed - base).max() > 10
        assert np.array_equal(draw(eng, "a red circle")[0], base)  # no leak into the next request
    finally:
        path.unlink()


@pytest.mark.parametrize("kind", NO_RANK_KINDS)
def test_each_lycoris_module_is_its_layer_with_the_difference_merged_and_comes_off_exactly(sd1, kind):
    """Every module of the file, hooked on its layer at the tag's strengths, computes what a copy of the layer with
    the difference merged into its weights (re-stated in ``merged_copy``) computes; unhooked, exactly the layer."""
    from types import SimpleNamespace

    from brushwork.engine import lycoris

    state = lycoris_no_rank(sd1, kind)
    network, note = lycoris.read(sd1, state, SimpleNamespace(name=name_of(kind), path=None))
    assert note is None and len(network.modules) == len({k.partition(".")[0] for k in state})  # the TE's too
    g = torch.Generator().manual_seed(0)
    cases = []
    for module in network.modules:
        layer, strength = module.target, 0.8 if module.part == "unet" else 0.6
        if isinstance(layer, torch.nn.Linear):
            x = torch.randn(2, 3, layer.in_features, generator=g)
        elif isinstance(layer, torch.nn.Conv2d):
            x = torch.randn(1, layer.in_channels, 5, 5, generator=g)
        elif isinstance(layer, torch.nn.GroupNorm):
            x = torch.randn(1, layer.num_channels, 4, 4, generator=g)
        else:
            x = torch.randn(2, 3, *layer.normalized_shape, generator=g)
        cases.append((layer, x, merged_copy(layer, module.tensors, strength)))  # copied before any hook is on
    assert {type(layer).__name__ for layer, _, _ in cases} == {
        "(IA)^3": {"Linear"}, "OFT": {"Linear", "Conv2d"}, "full": {"Linear", "Conv2d"},
        "norm": {"LayerNorm", "GroupNorm"}}[kind]
    hooks = lycoris.Hooks()
    with torch.no_grad():
        before = [layer(x) for layer, x, _ in cases]
        hooks.attach([(network, 0.6, 0.8)])
        try:
            for (layer, x, merged), plain in zip(cases, before, strict=True):
                hooked = layer(x)
                assert torch.allclose(hooked, merged(x), atol=1e-4, rtol=1e-4)
                assert (hooked - plain).abs().max() > 1e-2
        finally:
            hooks.remove()
        for (layer, x, _), plain in zip(cases, before, strict=True):
            assert torch.equal(layer(x), plain)


def test_a_lora_with_linear_shaped_1x1_convolutions_is_the_same_4d_lora(library, eng, sd1, base):
    """A1111 reshapes a 1x1 convolution's 2-D up / down to (out, in, 1, 1) (some trainers write SD 1.x's proj_in /
    proj_out so); peft alone refuses the shapes. The picture is the one of the 4-D file with the same values."""
    flat = {k: v.flatten(1) if v.dim() == 4 else v for k, v in kohya_lora(sd1).items()}
    assert any(k.endswith("proj_in.lora_down.weight") and v.dim() == 2 for k, v in flat.items())
    path = library / "models" / "lora" / "flat.safetensors"
    save_file(flat, path)
    try:
        mine, _ = draw(eng, "a red circle <lora:flat:0.8>")
        assert np.abs(mine - base).max() > 10
        assert np.array_equal(mine, draw(eng, "a red circle <lora:style:0.8>")[0])
        assert np.array_equal(draw(eng, "a red circle")[0], base)
    finally:
        path.unlink()


def test_1x1_up_and_down_are_fitted_to_the_layer_they_are_for():
    """A 4-D 1x1 pair for a Linear layer (SD 1.x's proj_in on SD 2.x / SDXL's Linear one) is flattened; 2-D ones
    for a 3x3 convolution, and layers the model does not have, are left as they are (peft then says what is wrong)."""
    from brushwork.engine.lora import _fit_1x1

    unet = torch.nn.ModuleDict({"proj_in": torch.nn.Linear(8, 8), "conv": torch.nn.Conv2d(8, 8, 1),
                                "conv3": torch.nn.Conv2d(8, 8, 3)})
    fitted = _fit_1x1({"unet.proj_in.lora.down.weight": torch.ones(2, 8, 1, 1),
                       "conv.lora_B.weight": torch.ones(8, 2), "unet.conv3.lora.down.weight": torch.ones(2, 8),
                       "text_encoder.q.lora.up.weight": torch.ones(8, 2, 1, 1)}, unet)
    assert {k: tuple(v.shape) for k, v in fitted.items()} == {
        "unet.proj_in.lora.down.weight": (2, 8), "conv.lora_B.weight": (8, 2, 1, 1),
        "unet.conv3.lora.down.weight": (2, 8), "text_encoder.q.lora.up.weight": (8, 2, 1, 1)}


def test_an_sdxl_kohya_lora_reaches_both_text_encoders_and_is_plain_diffusers(tmp_path):
    """lora_te1_ / lora_te2_ / lora_unet_ on the tiny SDXL model: the pixels of plain diffusers' SDXL pipeline that
    loads the same file, and no trace after."""
    from brushwork import Engine, Settings
    from tinymodels import build_xl_components, save_xl_single, xl_pipeline

    models = tmp_path / "models"
    (models / "lora").mkdir(parents=True)
    save_xl_single(models / "xl.safetensors")
    unet, _, te, te2 = build_xl_components(0)
    state = kohya_lora(None, models=[("lora_unet_", unet), ("lora_te1_", te), ("lora_te2_", te2)])
    assert any(k.startswith("lora_te2_") for k in state) and any(k.startswith("lora_te1_") for k in state)
    save_file(state, models / "lora" / "xl-style.safetensors")
    engine = Engine(Settings(home=tmp_path / "home", models_dir=models))

    def xl_draw(prompt):
        result = engine.generate(GenerationRequest(prompt=prompt, model="xl", sampler="Euler", steps=STEPS, seed=SEED,
                                                   width=64, height=64, watermark=False, cfg_scale=7.0))
        return np.asarray(result.images[0]).astype(int)

    plain = xl_draw("a red circle")
    mine = xl_draw("a red circle <lora:xl-style:0.8>")
    assert np.abs(mine - plain).max() > 10
    assert np.array_equal(xl_draw("a red circle"), plain)
    pipe = xl_pipeline()
    pipe.load_lora_weights(str(models / "lora" / "xl-style.safetensors"), adapter_name="x")
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    pipe.set_adapters(["x"], [0.8])
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(SEED))
    with torch.inference_mode():
        theirs = pipe(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=7.0, latents=latents,
                      height=64, width=64).images[0]
    assert np.array_equal(mine, np.asarray(theirs).astype(int))


# ---- what goes wrong ---------------------------------------------------------------------------------------


def test_an_unknown_lora_is_a_one_line_error_listing_the_library(eng):
    with pytest.raises(InvalidRequest, match=r"LoRA 'nothere' not found in the library's lora/ folder \(has: "
                                             r"peft-style, second, style\)"):
        draw(eng, "a cat <lora:nothere:1>")


def test_lycoris_kinds_not_applied_and_loras_for_another_model_say_so(library, eng, sd1):
    folder = library / "models" / "lora"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.a1.weight": torch.zeros(2, 32)},
              folder / "glora.safetensors")
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 1280),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 2)},
              folder / "xl-only.safetensors")
    wide = {k: torch.zeros(v.shape[0], 64) if k.endswith("to_q.lora_down.weight") else v
            for k, v in kohya_lora(sd1, te=False).items()}
    save_file(wide, folder / "too-wide.safetensors")
    from brushwork.engine import lora

    draw(eng, "a cat")
    before = lora.loaded(eng._loaded.parts)
    try:
        with pytest.raises(ModelError, match=r"glora.safetensors is a LyCORIS GLoRA file; brushwork applies LoRA, "
                                             r"LoCon, LoHa, LoKr, \(IA\)\^3, OFT, full and norm files, not yet"):
            draw(eng, "a cat <lora:glora:1>")
        with pytest.raises(ModelError, match="xl-only.safetensors changes no layer of this model"):
            draw(eng, "a cat <lora:xl-only:1>")
        with pytest.raises(ModelError, match="too-wide.safetensors does not fit this model"):
            draw(eng, "a cat <lora:too-wide:1>")
    finally:
        for name in ("glora", "xl-only", "too-wide"):
            (folder / f"{name}.safetensors").unlink()
    assert lora.loaded(eng._loaded.parts) == before  # a file that failed left nothing behind


# ---- reading an infotext back --------------------------------------------------------------------------------


def test_an_infotext_finds_a_renamed_lora_by_its_hash(library, eng):
    from brushwork.output.infotext import request_from_infotext

    first, result = draw(eng, "a red circle <lora:style:0.7>")
    folder = library / "models" / "lora"
    (folder / "style.safetensors").rename(folder / "renamed.safetensors")
    try:
        again = request_from_infotext(result.infotexts[0], loras=eng.loras)
        assert again["prompt"] == "a red circle <lora:stylish:0.7>"  # the file of that hash, by its alias
        assert request_from_infotext(result.infotexts[0])["prompt"] == "a red circle <lora:style:0.7>"
        redrawn, _ = draw(eng, again["prompt"])
        assert np.array_equal(redrawn, first)
    finally:
        (folder / "renamed.safetensors").rename(folder / "style.safetensors")


# ---- the A1111 routes ----------------------------------------------------------------------------------------


def test_sdapi_lists_loras_and_applies_the_tags(library):
    from fastapi.testclient import TestClient

    from brushwork.server.app import create_app
    from serverkit import decode_png

    engine = engine_for(library, "server-home")
    with TestClient(create_app(engine, engine.settings)) as client:
        listed = client.get("/sdapi/v1/loras").json()
        style = next(item for item in listed if item["name"] == "style")
        assert set(style) == {"name", "alias", "path", "metadata"}
        assert style["alias"] == "stylish" and style["metadata"] == {"ss_output_name": "stylish"}
        assert style["path"].endswith("lora/style.safetensors")
        assert client.post("/sdapi/v1/refresh-loras").json() is None
        body = {"prompt": "a cat <lora:style:0.8>", "seed": 1, "width": SIZE, "height": SIZE, "steps": 2}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        text = decode_png(r.json()["images"][0]).info["parameters"]
        assert text.startswith("a cat <lora:style:0.8>") and 'Lora hashes: "style: ' in text
        r = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat <lora:missing:1>"})
        assert r.status_code == 400 and "LoRA 'missing' not found" in r.text


# ---- LCM-LoRA ----------------------------------------------------------------------------------------------


def test_an_lcm_lora_picks_the_lcm_sampler_4_steps_and_no_cfg_where_the_request_leaves_them_open(tiny, sd1, tmp_path):
    """An LCM-LoRA (by its file name, the hub folder its pytorch_lora_weights sits in, or its metadata) in the
    prompt: the LCM sampler, 4 steps, CFG 1 where the request did not say; an ordinary LoRA changes nothing."""
    from types import SimpleNamespace

    from brushwork.engine.run import model_defaults

    models = tmp_path / "models"
    hub = models / "lora" / "models--latent-consistency--lcm-lora-sdv1-5" / "snapshots" / "0123abc"
    hub.mkdir(parents=True)
    shutil.copyfile(tiny["sd1"]["safetensors"], models / "tiny.safetensors")
    save_file(kohya_lora(sd1), models / "lora" / "lcm-lora-sdv1-5.safetensors")
    save_file(peft_lora(sd1), hub / "pytorch_lora_weights.safetensors")
    save_file(kohya_lora(sd1, seed=4), models / "lora" / "fast.safetensors", metadata={"ss_output_name": "LCM_LoRA_SD15"})
    save_file(kohya_lora(sd1, seed=5), models / "lora" / "style.safetensors")
    engine = engine_for(tmp_path)
    library = engine.loras
    whys = {f.name: library.lcm_lora(f) for f in library.files()}
    assert whys == {"fast": "its ss_output_name", "lcm-lora-sdv1-5": "its name lcm-lora-sdv1-5",
                    "pytorch_lora_weights": "its folder models--latent-consistency--lcm-lora-sdv1-5", "style": None}

    result = engine.generate(GenerationRequest(prompt="a red circle <lora:lcm-lora-sdv1-5:1>", model="tiny", seed=SEED,
                                               width=SIZE, height=SIZE, watermark=False))
    assert "Steps: 4, Sampler: LCM, CFG scale: 1," in result.infotexts[0]
    assert any(note.startswith("lcm-lora-sdv1-5 is an LCM-LoRA (its name lcm-lora-sdv1-5): LCM, 4 steps, CFG 1")
               for note in result.notes)

    # on a checkpoint that recommends its own sampler, steps and CFG, the LoRA's win where the request leaves them
    parts = SimpleNamespace(name="tiny", unet=SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=None)),
                            defaults={"sampler": "DPM++ 2M", "steps": 30, "cfg_scale": 6.0}, scheduler_config={})

    def filled(prompt, **kw):
        request, notes = model_defaults(GenerationRequest(prompt=prompt, **kw), parts, library)
        return (request.sampler, request.steps, request.cfg_scale), notes

    assert filled("a <lora:pytorch_lora_weights:0.8>")[0] == ("LCM", 4, 1.0)
    assert filled("a <lora:LCM_LoRA_SD15>", sampler="LCM")[0] == ("LCM", 4, 1.0)  # named: the same steps and CFG
    assert filled("a <lora:fast>", sampler="LCM", steps=6, cfg_scale=1.5) == (("LCM", 6, 1.5), [])  # its own kept
    assert filled("a <lora:fast>", sampler="Euler a")[0] == ("Euler a", 30, 6.0)  # another sampler: as before
    assert filled("a <lora:style:1>")[0] == ("DPM++ 2M", 30, 6.0)  # an ordinary LoRA: the checkpoint's
    assert filled("a <lora:fast:1:0>")[0] == ("DPM++ 2M", 30, 6.0)  # no UNet strength: not applied to the UNet
    assert filled("a <lora:fast:0.8>", sampler="LCM")[1][0].startswith(
        "fast is an LCM-LoRA (its ss_output_name): 4 steps, CFG 1 (no CFG: one UNet pass a step) where the request")


def test_a_hires_checkpoint_runs_its_pass_with_the_loras_as_a1111_activates_them_again(eng, tiny, tmp_path):
    """A1111 activates the prompt's extra networks again on the checkpoint it switches to: a hires checkpoint with
    the model's very weights and the same LoRA draws the picture the model draws alone; without the tag, the next
    request's second pass is the plain checkpoint's again (nothing left on it)."""
    twin = shutil.copyfile(tiny["sd1"]["safetensors"], tmp_path / "tiny-twin.safetensors")  # the model's weights
    hires = dict(hires_scale=2, hires_steps=2)
    plain, _ = draw(eng, "<lora:style:1> a red circle", **hires)
    other, result = draw(eng, "<lora:style:1> a red circle", hires_checkpoint=str(twin), **hires)
    assert not [n for n in result.notes if "LoRAs apply" in n], result.notes
    assert np.array_equal(plain, other)  # the same weights and the same LoRA on both passes
    assert "Lora hashes" in result.infotexts[0] and "Hires checkpoint: tiny-twin [" in result.infotexts[0]
    strengths, _ = draw(eng, "<lora:style:1:0> a red circle", hires_checkpoint=str(twin), **hires)
    assert np.abs(strengths - other).max() > 0  # the tag's strengths (text encoder only) on the twin too
    assert np.array_equal(strengths, draw(eng, "<lora:style:1:0> a red circle", **hires)[0])
    without, _ = draw(eng, "a red circle", hires_checkpoint=str(twin), **hires)
    assert np.array_equal(without, draw(eng, "a red circle", **hires)[0])  # no LoRA left on the twin
    assert np.abs(without - other).max() > 0


def test_on_openvino_a_lora_keeps_what_it_changes_on_torch_and_draws_torch_s_picture(library, eng):
    """The converted text encoder and UNet have the plain weights: a LoRA's request runs the parts it changes on
    torch (one note each), so its picture is torch's; the same engine's next plain request is on OpenVINO again."""
    pytest.importorskip("openvino")
    from brushwork import Engine, Settings

    ov = Engine(Settings(home=library / "ov-home", models_dir=library / "models", backend="openvino"))
    for tag, notes in (("<lora:style:1:0>", ["the text encoder runs on torch for this request (a LoRA on the text "
                                             "encoder)"]),
                       ("<lora:style:0:1>", ["the UNet runs on torch for this request (a LoRA on the UNet)"])):
        on_torch, _ = draw(eng, f"a red circle {tag}")
        on_ov, result = draw(ov, f"a red circle {tag}")
        said = [n.removeprefix("OpenVINO: ") for n in result.notes if n.startswith("OpenVINO: the")
                and "runs on torch" in n]
        assert said == notes, result.notes
        assert np.abs(on_ov - on_torch).max() <= 1  # the decoder is OpenVINO's: its rounding, at most 1/255
    plain, result = draw(ov, "a red circle")
    assert not [n for n in result.notes if "runs on torch" in n], result.notes
    assert ov._loaded.parts.backend.stats["compiled"] >= 3  # the text encoder, the UNet, the VAE decoder


def test_an_encoding_a_lora_changes_is_never_kept_for_the_next_request(eng, base):
    """The model keeps its last prompt encodings (A1111's cached conds), but never one a LoRA on the text encoder
    made: the same tags encode again, and the plain prompt after them is the plain picture."""
    calls = []
    hook = eng._loaded.parts.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        first, _ = draw(eng, "a red circle <lora:style:1:0>")
        second, _ = draw(eng, "a red circle <lora:style:1:0>")
        assert len(calls) == 4 and np.array_equal(first, second)  # prompt and negative, twice
        plain, _ = draw(eng, "a red circle")
        assert np.array_equal(plain, base) and np.abs(first - base).max() > 0
        assert len(calls) == 4  # the plain prompt's encoding was kept from before
    finally:
        hook.remove()


def test_a_lora_that_does_not_fit_the_hires_checkpoint_is_one_line_before_any_step(eng, tiny, tmp_path,
                                                                                    monkeypatch):
    from brushwork.engine import lora as lora_mod

    twin = shutil.copyfile(tiny["sd1"]["safetensors"], tmp_path / "tiny-twin.safetensors")
    real, steps = lora_mod.load, []

    def load(parts, lora, **kw):  # the twin stands for a checkpoint of other shapes
        if parts.name == "tiny-twin":
            raise ModelError(f"{lora.path.name} does not fit this model (its shapes)")
        return real(parts, lora, **kw)

    monkeypatch.setattr(lora_mod, "load", load)
    with pytest.raises(ModelError, match=r"^the hires checkpoint tiny-twin: style.safetensors does not fit this model"):
        eng.generate(GenerationRequest(prompt="<lora:style:1> a red circle", model="tiny", steps=STEPS, seed=SEED,
                                       width=SIZE, height=SIZE, watermark=False, hires_scale=2, hires_steps=1,
                                       hires_checkpoint=str(twin)), progress=lambda p: steps.append(p))
    assert steps == []  # refused before the first step
    monkeypatch.undo()
    after, _ = draw(eng, "a red circle")
    assert after.shape[0] == SIZE  # the engine goes on
