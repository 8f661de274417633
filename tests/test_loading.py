"""Loading every format of every family through the public loader, and refusing bad files."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from brushwork import GenerationRequest, ModelError
from brushwork.models.load import load_diffusers_folder, load_single_file


def _state(model):
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["sd1", "sd1-inpaint", "sd2", "sd2-inpaint"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_round_trips_every_tensor(tiny, family, fmt):
    from tinymodels import build_components

    parts = load_single_file(tiny[family][fmt], prediction="eps" if family == "sd2" else None)
    assert parts.family.name == family
    for original, loaded in zip(build_components(family), (parts.unet, parts.vae, parts.text_encoder), strict=True):
        a, b = _state(original), _state(loaded)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), "a tensor changed on the way through the original layout"


def test_detects_architecture_from_shapes(tiny):
    parts = load_single_file(tiny["sd2"]["safetensors"], prediction="v")
    assert parts.unet.config.block_out_channels == (32, 64) or list(parts.unet.config.block_out_channels) == [32, 64]
    assert parts.unet.config.use_linear_projection is True  # SD 2.x
    assert parts.text_encoder.config.hidden_act == "gelu"  # OpenCLIP
    assert parts.text_encoder.config.num_hidden_layers == 2  # penultimate of 3 blocks
    assert parts.scheduler_config["prediction_type"] == "v_prediction"
    assert parts.default_size == (768, 768)
    sd1 = load_single_file(tiny["sd1"]["safetensors"])
    assert sd1.unet.config.attention_head_dim == 8 and sd1.default_size == (512, 512)
    assert sd1.tokenizer.pad_token == "<|endoftext|>"
    assert parts.tokenizer.pad_token == "!"


def test_a_time_embedding_narrower_than_sds_is_read_from_the_file(tmp_path):
    # SD's UNet embeds the timestep in 4x its first width; a small model (the bundled mini) may use less
    from tinymodels import build_components, save_single

    path = save_single(tmp_path / "m.safetensors", "sd1", time_embedding_dim=48)
    unet = load_single_file(path).unet
    assert unet.config.time_embedding_dim == 48
    a, b = _state(build_components("sd1", time_embedding_dim=48)[0]), _state(unet)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sd2_prediction_needs_a_flag_yaml_or_known_hash(tiny, tmp_path):
    with pytest.raises(ModelError, match="--prediction v"):
        load_single_file(tiny["sd2"]["safetensors"])
    model = tmp_path / "my-sd2.safetensors"
    shutil.copy(tiny["sd2"]["safetensors"], model)
    model.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n    scale_factor: 0.18215\n")
    assert load_single_file(model).prediction == "v"
    model.with_suffix(".yaml").unlink()
    assert load_single_file(model, short_hash=lambda: "dcd690123c").prediction == "v"  # official 768 file
    assert load_single_file(model, short_hash=lambda: "df955bdf6b").prediction == "eps"  # official 512 file


def test_modelspec_resolution_sets_default_size(tmp_path):
    from tinymodels import save_single

    path = save_single(tmp_path / "m.safetensors", "sd1", metadata={"modelspec.resolution": "64x96"})
    assert load_single_file(path).default_size == (64, 96)


@pytest.mark.parametrize(("family", "metadata", "size"), [
    ("sd1", {}, (512, 512)),
    ("sd1", {"modelspec.resolution": "64x96"}, (64, 96)),
    ("sd2", {"modelspec.prediction_type": "v"}, (768, 768)),  # SD 2.x 768-v
    ("sd2", {"brushwork.defaults": '{"turbo": true}'}, (512, 512)),  # SD-Turbo: 512, eps
    ("sd1", {"brushwork.defaults": '{"width": 40, "height": 48}'}, (40, 48)),
])
def test_the_model_list_tells_the_size_loading_finds(tmp_path, family, metadata, size):
    """``native_size`` (GET /api/v1/models, the web UI's size fields) reads the header alone: what the loader sets."""
    from brushwork.models.load import native_size
    from tinymodels import save_single

    path = save_single(tmp_path / "m.safetensors", family, metadata=metadata)
    assert native_size(path, family) == size == load_single_file(path).default_size
    assert native_size(path, None) is None and native_size(tmp_path / "gone.safetensors", family) is None


def test_a_models_recommended_cfg_applies_only_when_the_request_leaves_it_open(tmp_path, engine):
    from brushwork.models.load import recommended_defaults
    from tinymodels import save_single

    path = save_single(tmp_path / "m.safetensors", "sd1", metadata={"brushwork.defaults": '{"cfg_scale": 3.5}'})
    assert recommended_defaults(path) == {"cfg_scale": 3.5}
    common = dict(prompt="a red circle", model=str(path), steps=2, seed=7, width=32, height=32, watermark=False)
    open_cfg = engine.generate(GenerationRequest(**common))
    assert "CFG scale: 3.5" in open_cfg.infotexts[0] and open_cfg.request.cfg_scale == 3.5
    same = engine.generate(GenerationRequest(**common, cfg_scale=3.5))
    assert np.array_equal(np.asarray(open_cfg.images[0]), np.asarray(same.images[0]))
    assert "CFG scale: 5" in engine.generate(GenerationRequest(**common, cfg_scale=5)).infotexts[0]
    # no recommendation, or a broken one: the usual 7
    for metadata in ({}, {"brushwork.defaults": "{not json"}, {"brushwork.defaults": '{"cfg_scale": "high"}'}):
        other = save_single(tmp_path / f"m{len(str(metadata))}.safetensors", "sd1", metadata=metadata)
        assert "CFG scale: 7" in engine.generate(GenerationRequest(**{**common, "model": str(other)})).infotexts[0]


def test_cfg_can_end_before_the_last_steps_and_a_model_can_recommend_where(tmp_path, engine):
    from brushwork.output.infotext import request_from_infotext
    from tinymodels import save_single

    path = save_single(tmp_path / "m.safetensors", "sd1",
                       metadata={"brushwork.defaults": '{"cfg_scale": 5, "cfg_end": 0.5}'})
    common = dict(prompt="a red circle", model=str(path), steps=4, seed=7, width=32, height=32, watermark=False)

    def pixels(result):
        return np.asarray(result.images[0]).astype(int)

    recommended = engine.generate(GenerationRequest(**common))
    assert recommended.request.cfg_end == 0.5 and "CFG end: 0.5," in recommended.infotexts[0]
    every_step = engine.generate(GenerationRequest(**common, cfg_end=1))
    assert "CFG end" not in every_step.infotexts[0]
    without_cfg = engine.generate(GenerationRequest(**common, cfg_scale=1))
    # two of four steps guided: neither the fully guided picture nor the unguided one
    assert np.abs(pixels(recommended) - pixels(every_step)).max() > 0
    assert np.abs(pixels(recommended) - pixels(without_cfg)).max() > 0
    # the PNG's parameters remake it exactly; an infotext without the key means CFG on every step
    again = engine.generate(GenerationRequest(**{**request_from_infotext(recommended.infotexts[0]),
                                                 "model": str(path), "watermark": False}))
    assert np.array_equal(pixels(again), pixels(recommended))
    assert request_from_infotext(every_step.infotexts[0])["cfg_end"] == 1.0
    # out-of-range recommendations are ignored
    for n, bad in enumerate(('{"cfg_end": 0}', '{"cfg_end": 1.5}', '{"cfg_end": "soon"}')):
        other = save_single(tmp_path / f"bad{n}.safetensors", "sd1", metadata={"brushwork.defaults": bad})
        assert engine.generate(GenerationRequest(**{**common, "model": str(other)})).request.cfg_end == 1.0


def test_same_weights_in_three_formats_give_identical_images(tiny, engine):
    images = []
    for fmt in ("safetensors", "ckpt", "diffusers"):
        req = GenerationRequest(prompt="a red circle", model=str(tiny["sd1"][fmt]), steps=2, seed=7, width=32,
                                height=32, watermark=False)
        images.append(np.asarray(engine.generate(req).images[0]))
    assert np.array_equal(images[0], images[1])
    assert np.array_equal(images[0], images[2])


def test_diffusers_folder_loads(tiny):
    parts = load_diffusers_folder(tiny["sd1"]["diffusers"])
    assert parts.family.name == "sd1" and parts.source == "diffusers"


def test_truncated_safetensors_is_a_clear_error(tiny, tmp_path):
    data = tiny["sd1"]["safetensors"].read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        load_single_file(broken)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="not a valid .safetensors"):
        load_single_file(garbage)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_ckpt_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(str(target))}, evil, pickle_module=pickle)
    with pytest.raises(ModelError, match="brushwork models convert"):
        load_single_file(evil)
    assert not target.exists()


def test_unknown_layout_names_what_was_found(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"some.random.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelError, match="some.random.weight"):
        load_single_file(path)
    vae_only = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(vae_only))
    with pytest.raises(ModelError, match="--vae"):
        load_single_file(vae_only)


def test_vae_swap(tiny, engine, tmp_path):
    from safetensors.torch import save_file

    from brushwork.models.convert import vae_to_original
    from tinymodels import build_components

    _, other_vae, _ = build_components("sd1", seed=5)
    sd = {k.removeprefix("first_stage_model."): v for k, v in vae_to_original(other_vae.state_dict(),
                                                                               other_vae.config).items()}
    vae_file = tmp_path / "other.vae.safetensors"
    save_file(sd, str(vae_file))
    base = GenerationRequest(prompt="x", model=str(tiny["sd1"]["safetensors"]), steps=2, seed=1, width=32, height=32,
                             watermark=False)
    plain = np.asarray(engine.generate(base).images[0])
    swapped = engine.generate(GenerationRequest(**{**base.__dict__, "vae": str(vae_file)}))
    assert not np.array_equal(plain, np.asarray(swapped.images[0]))
    assert "VAE: other.vae.safetensors" in swapped.infotexts[0]
