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
