"""The model library: finding models by name, title, hash; the default order; hub ids offline."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from brushwork import GenerationRequest, ModelError, Settings
from brushwork.models.store import ModelStore, bundled_model_path


@pytest.fixture
def library(tiny, tmp_path):
    settings = Settings(home=tmp_path / "home")
    settings.models_dir.mkdir(parents=True)
    shutil.copy(tiny["sd1"]["safetensors"], settings.models_dir / "alpha.safetensors")
    shutil.copy(tiny["sd1"]["ckpt"], settings.models_dir / "beta.ckpt")
    return settings


def test_find_by_name_file_title_and_hash(library):
    store = ModelStore(library)
    alpha = store.resolve("alpha")[0]
    assert alpha.path.name == "alpha.safetensors"
    sha = hashlib.sha256(alpha.path.read_bytes()).hexdigest()
    assert store.with_hash(alpha).short_hash == sha[:10]
    assert store.resolve("beta.ckpt")[0].name == "beta"
    assert store.resolve(f"alpha.safetensors [{sha[:10]}]")[0].name == "alpha"
    assert store.resolve(sha[:10])[0].name == "alpha"
    assert alpha.title == f"alpha.safetensors [{sha[:10]}]"


def test_hash_is_computed_once_and_cached(library):
    store = ModelStore(library)
    entry = store.resolve("alpha")[0]
    first = store.with_hash(entry).sha256
    cache = library.cache_dir / "hashes.json"
    cache.write_text(cache.read_text().replace(first, "f" * 64))
    # a new process answers from the cache (it would give the real hash if it read the file again)
    assert ModelStore(library).hashes.sha256(entry.path) == "f" * 64
    entry.path.touch()  # a changed file is hashed again
    assert ModelStore(library).hashes.sha256(entry.path) == first


def test_default_order_library_first_then_bundled(library, tmp_path):
    entry, hint = ModelStore(library).resolve(None)
    assert entry.name == "alpha" and hint is None
    empty = Settings(home=tmp_path / "empty")
    if bundled_model_path().is_file():
        entry, hint = ModelStore(empty).resolve(None)
        assert entry.bundled and "checkpoint" in hint
    configured = Settings(home=library.home, default_model="beta")
    from brushwork import Engine

    assert Engine(configured).resolve(None)[0].name == "beta"


def test_unknown_name_lists_the_library(library):
    with pytest.raises(ModelError, match=r"not found.*alpha, beta"):
        ModelStore(library).resolve("gamma")


def test_hub_id_offline_is_a_clear_error_not_a_hang(library):
    from brushwork import Engine

    with pytest.raises(ModelError, match="offline"):
        Engine(library).generate(GenerationRequest(prompt="x", model="someone/some-model", steps=1))


def test_one_resolver_case_hashes_and_paths_only_where_allowed(library, tmp_path):
    store = ModelStore(library)
    alpha = store.find("alpha")
    sha = store.with_hash(alpha).sha256
    assert store.find("ALPHA").name == "alpha"  # exact first, then ignoring case (as A1111's titles)
    assert store.find(sha[:16]).name == "alpha"  # a longer sha256 prefix
    from brushwork.models.store import legacy_hash

    beta = store.find("beta")
    assert store.find(legacy_hash(beta.path)).name == "beta"  # A1111's old 8-hex hash
    outside = tmp_path / "outside.safetensors"
    shutil.copy(alpha.path, outside)
    assert store.find(str(outside)).path == outside  # the CLI may name a file
    with pytest.raises(ModelError, match="not in the library"):
        store.find(str(outside), paths=False)  # HTTP may not
    with pytest.raises(ModelError, match="not in the library"):
        store.find("someone/some-model", paths=False)  # nor a hub id


def test_family_is_read_from_the_header_and_remembered(tiny, tmp_path):
    import torch
    from safetensors.torch import save_file

    settings = Settings(home=tmp_path / "home")
    settings.models_dir.mkdir(parents=True)
    shutil.copy(tiny["sd1"]["safetensors"], settings.models_dir / "one.safetensors")
    shutil.copy(tiny["sd2-inpaint"]["ckpt"], settings.models_dir / "two-inpaint.ckpt")
    shutil.copytree(tiny["sd1"]["diffusers"], settings.models_dir / "folder")
    # key names are enough: an SDXL base and refiner, a depth model (5 channels), a LoRA
    t = torch.zeros(1)
    xl = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": t,
          "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 1, 1)}
    save_file({**xl, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816)},
              settings.models_dir / "xl.safetensors")
    save_file({"conditioner.embedders.0.model.token_embedding.weight": t,  # the refiner: OpenCLIP bigG alone
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 1, 1),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1536, 2560)},
              settings.models_dir / "xl-refiner.safetensors")
    save_file({"cond_stage_model.model.token_embedding.weight": t,
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 5, 3, 3)},
              settings.models_dir / "depth.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t},
              settings.models_dir / "style-lora.safetensors")
    from brushwork import Engine

    families = {e.name: e.family for e in Engine(settings).list_models()}
    assert families == {"one": "sd1", "two-inpaint": "sd2-inpaint", "folder": "sd1", "xl": "sdxl",
                        "xl-refiner": "sdxl-refiner", "depth": "sd2-depth", "style-lora": "lora",
                        "mini": "sd1"}
    cache = (settings.cache_dir / "hashes.json").read_text()
    assert '"family": "sdxl-refiner"' in cache  # read once, then from the cache with the hash
