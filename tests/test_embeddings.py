"""Textual-inversion embeddings (issue 15): the library's embeddings/ files used by name in prompts, as A1111 uses
them: the name's tokens become the embedding's vectors, inside one 75-token chunk; a prompt without a name is
encoded exactly as before."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from brushwork import GenerationRequest
from brushwork.engine.prompts import CHUNK, EmbeddingToken, encode, tokenize_weighted
from brushwork.errors import ModelError
from brushwork.models.embeddings import EmbeddingLibrary, read_embedding

WIDTH = 32  # the tiny models' text encoder width
SIZE, STEPS, SEED = 32, 3, 4


def a1111_pt(path, tensor, **extra):
    """An embedding as A1111's training writes it."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": path.stem,
                "step": 500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny", **extra}, path)
    return path


def vectors(n: int, seed: int, width: int = WIDTH):
    return torch.randn((n, width), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def library(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings-library")
    folder = root / "models" / "embeddings"
    (folder / "sub").mkdir(parents=True)
    shutil.copyfile(tiny["sd1"]["safetensors"], root / "models" / "tiny.safetensors")
    a1111_pt(folder / "shinystyle.pt", vectors(2, 1) * 0.5)
    save_file({"emb_params": vectors(1, 2)}, folder / "sub" / "badhands.safetensors")
    torch.save({"<cat-toy>": vectors(1, 3)[0]}, folder / "cattoy.bin")  # diffusers' learned_embeds.bin
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, folder / "xlstyle.safetensors")
    save_file({"emb_params": vectors(1, 4, width=64)}, folder / "widestyle.safetensors")
    return root


def engine_for(root, home="home"):
    from brushwork import Engine, Settings

    return Engine(Settings(home=root / home, models_dir=root / "models"))


@pytest.fixture(scope="module")
def db(library):
    return engine_for(library).embeddings.for_encoders([("", WIDTH)])


@pytest.fixture(scope="module")
def sd1(tiny):
    from brushwork.models.load import load_single_file

    return load_single_file(tiny["sd1"]["safetensors"])


def test_every_format_is_read_as_a1111_reads_it(library):
    folder = library / "models" / "embeddings"
    shiny = read_embedding(folder / "shinystyle.pt")
    assert (shiny.name, shiny.count, shiny.shape, shiny.step) == ("shinystyle", 2, WIDTH, 500)
    assert (shiny.sd_checkpoint, shiny.sd_checkpoint_name) == ("0123456789", "tiny")
    assert torch.equal(shiny.vectors_for(), vectors(2, 1) * 0.5)
    assert read_embedding(folder / "sub" / "badhands.safetensors").count == 1
    assert read_embedding(folder / "cattoy.bin").vectors_for().shape == (1, WIDTH)  # one vector: a row
    xl = read_embedding(folder / "xlstyle.safetensors")
    assert (xl.count, xl.shape, sorted(xl.vectors)) == (2, 768 + 1280, ["clip_g", "clip_l"])


def test_a_pickle_that_wants_code_and_a_file_that_is_no_embedding_are_refused(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "when": datetime.datetime.now()}, tmp_path / "x.pt")
    with pytest.raises(ModelError, match="x.pt contains code, not only weights"):
        read_embedding(tmp_path / "x.pt")
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, tmp_path / "two.safetensors")
    with pytest.raises(ModelError, match="two.safetensors is not a textual-inversion embedding"):
        read_embedding(tmp_path / "two.safetensors")


def test_embeddings_that_do_not_fit_the_model_are_skipped(db):
    assert sorted(db.loaded) == ["badhands", "cattoy", "shinystyle"]
    assert sorted(db.skipped) == ["widestyle", "xlstyle"]


def test_the_names_tokens_become_its_vectors_and_other_prompts_are_untouched(sd1, db):
    tok = sd1.tokenizer
    chunks = tokenize_weighted(tok, "a (shinystyle:1.2) cat", embeddings=db)
    plain = tokenize_weighted(tok, "a cat")[0]
    places = [(t, w) for t, w in chunks[0] if isinstance(t, EmbeddingToken)]
    assert [(t.embedding.name, t.index, int(t), w) for t, w in places] == [("shinystyle", 0, 0, 1.2),
                                                                          ("shinystyle", 1, 0, 1.2)]
    assert [t for t, _ in chunks[0] if not isinstance(t, EmbeddingToken)] == [t for t, _ in plain]
    assert "shinystyle" in db.used
    for prompt in ("a red circle, on the left", "shiny style, shinystyles", "BREAK (a:1.1) " * 30):
        assert tokenize_weighted(tok, prompt, embeddings=db) == tokenize_weighted(tok, prompt)
        z, _ = encode(sd1.text_encoder, tok, prompt, "", embeddings=db)
        assert torch.equal(z, encode(sd1.text_encoder, tok, prompt, "")[0])


def test_an_embedding_stays_within_one_chunk(sd1, db):
    tok = sd1.tokenizer
    words = " ".join(["cat"] * (CHUNK - 1))
    chunks = tokenize_weighted(tok, words + " shinystyle dog", embeddings=db)  # 74 tokens, then 2 vectors
    assert len(chunks[0]) == CHUNK - 1 and all(not isinstance(t, EmbeddingToken) for t, _ in chunks[0])
    assert [isinstance(t, EmbeddingToken) for t, _ in chunks[1]] == [True, True, False]


def test_encoding_puts_the_vectors_in_the_token_embeddings_places(sd1, db):
    """The reference: the embedding's vector written into row 0 of a copy's token embedding table, and its
    place given token id 0, as A1111 pads an embedding's places."""
    tok = sd1.tokenizer
    z, _ = encode(sd1.text_encoder, tok, "a badhands cat", "", embeddings=db)
    reference = copy.deepcopy(sd1.text_encoder)
    with torch.no_grad():
        reference.get_input_embeddings().weight[0] = db.loaded["badhands"].vectors_for()[0]
    ids = tok("a", add_special_tokens=False)["input_ids"] + [0] + tok("cat", add_special_tokens=False)["input_ids"]
    padded = [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (CHUNK - len(ids))
    with torch.inference_mode():
        expected = reference(torch.tensor([padded]))[0]
    assert torch.equal(z, expected)
    assert not torch.equal(z, encode(sd1.text_encoder, tok, "a cat", "")[0])


def test_an_embedding_changes_the_picture_only_when_named_and_its_hash_is_in_the_infotext(library, tiny, tmp_path):
    engine = engine_for(library)

    def draw(prompt, negative=""):
        result = engine.generate(GenerationRequest(prompt=prompt, negative_prompt=negative, model="tiny",
                                                   sampler="Euler", steps=STEPS, seed=SEED, width=SIZE, height=SIZE,
                                                   watermark=False))
        return np.asarray(result.images[0]).astype(int), result.infotexts[0]

    bare = tmp_path / "bare" / "models"
    bare.mkdir(parents=True)
    shutil.copyfile(tiny["sd1"]["safetensors"], bare / "tiny.safetensors")
    plain, text = draw("a red circle")
    without = engine_for(tmp_path / "bare").generate(GenerationRequest(  # a library without embeddings
        prompt="a red circle", model="tiny", sampler="Euler", steps=STEPS, seed=SEED, width=SIZE, height=SIZE,
        watermark=False))
    assert np.array_equal(plain, np.asarray(without.images[0]).astype(int))
    assert "TI hashes" not in text
    named, text = draw("a red circle, shinystyle", negative="badhands")
    assert np.abs(named - plain).max() > 0
    folder = library / "models" / "embeddings"
    shiny = hashlib.sha256((folder / "shinystyle.pt").read_bytes()).hexdigest()[:12]
    bad = hashlib.sha256((folder / "sub" / "badhands.safetensors").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "shinystyle: {shiny}, badhands: {bad}"' in text
    assert text.startswith("a red circle, shinystyle\nNegative prompt: badhands\n")


def test_sdapi_lists_the_loaded_and_skipped_embeddings(library):
    from fastapi.testclient import TestClient

    from brushwork.server.app import create_app

    engine = engine_for(library, "server-home")
    with TestClient(create_app(engine, engine.settings)) as client:
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 1})
        assert r.status_code == 200, r.text
        listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["shinystyle"] == {"step": 500, "sd_checkpoint": "0123456789",
                                              "sd_checkpoint_name": "tiny", "shape": WIDTH, "vectors": 2}
    assert sorted(listed["loaded"]) == ["badhands", "cattoy", "shinystyle"]
    assert listed["skipped"]["xlstyle"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                            "shape": 2048, "vectors": 2}
    assert sorted(listed["skipped"]) == ["widestyle", "xlstyle"]


def test_an_unreadable_file_is_left_out(tmp_path, caplog):
    from brushwork.models.store import ModelStore
    from brushwork.settings import Settings

    folder = tmp_path / "models" / "embeddings"
    folder.mkdir(parents=True)
    (folder / "broken.pt").write_bytes(b"not a pickle")
    save_file({"emb_params": vectors(1, 1)}, folder / "fine.safetensors")
    lib = EmbeddingLibrary(ModelStore(Settings(home=tmp_path / "home", models_dir=tmp_path / "models")))
    assert [e.name for e in lib.embeddings()] == ["fine"]
    assert "broken.pt" in caplog.text


def test_an_sdxl_embedding_gives_each_text_encoder_its_own_vectors(tmp_path):
    from brushwork import Engine, Settings
    from brushwork.engine.prompts import encode_xl
    from brushwork.models.load import load_single_file
    from tinymodels import save_xl_single

    models = tmp_path / "models"
    (models / "embeddings").mkdir(parents=True)
    save_xl_single(models / "xl.safetensors")
    clip_l, clip_g = vectors(2, 5), vectors(2, 6)  # the tiny SDXL's encoders are both 32 wide
    save_file({"clip_l": clip_l, "clip_g": clip_g}, models / "embeddings" / "xlshiny.safetensors")
    save_file({"clip_l": clip_l, "clip_g": clip_l * 0}, models / "embeddings" / "xlhalf.safetensors")
    save_file({"emb_params": vectors(1, 7)}, models / "embeddings" / "sdonly.safetensors")
    engine = Engine(Settings(home=tmp_path / "home", models_dir=models))
    parts = load_single_file(models / "xl.safetensors")
    db = engine.embeddings.for_model(parts)
    assert sorted(db.loaded) == ["xlhalf", "xlshiny"] and sorted(db.skipped) == ["sdonly"]
    encoders = [(parts.text_encoder, parts.tokenizer), (parts.text_encoder_2, parts.tokenizer_2)]
    plain = encode_xl(encoders, "a red circle", "")
    assert all(torch.equal(a, b) for a, b in zip(encode_xl(encoders, "a red circle", "", embeddings=db), plain,
                                                 strict=True))
    shiny = encode_xl(encoders, "a xlshiny circle", "", embeddings=db)[0]
    half = encode_xl(encoders, "a xlhalf circle", "", embeddings=db)[0]  # the same clip_l, another clip_g
    width = parts.text_encoder.config.hidden_size  # the features are CLIP-L's, then bigG's, side by side
    assert torch.equal(half[..., :width], shiny[..., :width]) and not torch.equal(half[..., width:], shiny[..., width:])

    def draw(prompt):
        result = engine.generate(GenerationRequest(prompt=prompt, model="xl", sampler="Euler", steps=STEPS, seed=SEED,
                                                   width=64, height=64, watermark=False, cfg_scale=7.0))
        return np.asarray(result.images[0]).astype(int), result.infotexts[0]

    base, text = draw("a red circle")
    named, named_text = draw("a red circle, xlshiny")
    assert np.abs(named - base).max() > 0 and "TI hashes" not in text and 'TI hashes: "xlshiny: ' in named_text


def test_the_refiner_reads_an_sdxl_embeddings_clip_g_and_leaves_loras_out_with_a_note(tmp_path, monkeypatch):
    """With a refiner, the refiner's steps encode the prompt with the embedding's ``clip_g`` vectors too (its bigG):
    the same run with the refiner's embeddings withheld has the same first steps and another picture. A LoRA tag
    applies to the model only, and the result says so."""
    from brushwork import Engine, Settings
    from brushwork.engine.networks import Networks
    from tinymodels import save_xl_single

    models = tmp_path / "models"
    (models / "embeddings").mkdir(parents=True)
    save_xl_single(models / "xl.safetensors")
    save_xl_single(models / "xl-refiner.safetensors", seed=1, refiner=True)
    save_file({"clip_l": vectors(2, 5), "clip_g": vectors(2, 6) * 4}, models / "embeddings" / "xlshiny.safetensors")
    engine = Engine(Settings(home=tmp_path / "home", models_dir=models))
    request = GenerationRequest(prompt="a red circle, xlshiny", model="xl", refiner="xl-refiner",
                                refiner_switch_at=0.5, sampler="Euler", steps=4, seed=SEED, width=64, height=64,
                                watermark=False, cfg_scale=7.0)

    def draw():
        previews = []
        result = engine.generate(request, progress=lambda info: previews.append(np.asarray(info.preview)),
                                 want_previews=True)
        return np.asarray(result.images[0]).astype(int), previews, result

    refined, previews, result = draw()
    assert 'TI hashes: "xlshiny: ' in result.infotexts[0]
    own = Networks.embeddings_for
    monkeypatch.setattr(Networks, "embeddings_for", lambda self, parts: own(self, parts) if parts is self.parts
                        else None)
    withheld, withheld_previews, _ = draw()
    assert [np.array_equal(a, b) for a, b in zip(previews, withheld_previews, strict=True)] == [True, True, False,
                                                                                              False]
    assert np.abs(refined - withheld).max() > 0
    assert not any("LoRA" in note for note in result.notes)

    from tinymodels import build_xl_components  # a LoRA on the model's attention queries (kohya's layout)
    unet = build_xl_components(0)[0]
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith("attn1.to_q"):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn((2, module.in_features), generator=g)
            state[f"{key}.lora_up.weight"] = torch.randn((module.out_features, 2), generator=g)
    (models / "lora").mkdir()
    save_file(state, models / "lora" / "xl-style.safetensors")
    request = dataclasses.replace(request, prompt="a red circle <lora:xl-style:0.8>")
    notes = draw()[2].notes
    assert "LoRAs apply to the model, not to the refiner (an SDXL LoRA does not fit the refiner's layers)" in notes


def test_a_prompt_encoded_again_is_read_from_the_model_s_last_encodings_with_its_ti_hashes(library, tmp_path):
    """As A1111's cached conds: the same prompts and settings again (a new seed) skip the text encoder, and the
    picture and the infotext's TI hashes are the ones a fresh encoding gives; another clip skip, and an embedding
    file changed on disk, encode again."""
    import time

    engine = engine_for(library, "cache-home")
    calls = []

    def draw(prompt, seed=SEED, **kw):
        result = engine.generate(GenerationRequest(prompt=prompt, negative_prompt="badhands", model="tiny",
                                                   sampler="Euler", steps=STEPS, seed=seed, width=SIZE, height=SIZE,
                                                   watermark=False, **kw))
        return np.asarray(result.images[0]).astype(int), result.infotexts[0]

    first, text = draw("a red circle, shinystyle")
    hook = engine._loaded.parts.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again, again_text = draw("a red circle, shinystyle")
        assert calls == [] and np.array_equal(again, first) and again_text == text
        assert 'TI hashes: "shinystyle: ' in text and "badhands: " in text
        other_seed, other_text = draw("a red circle, shinystyle", seed=SEED + 1)
        assert calls == [] and np.abs(other_seed - first).max() > 0 and "TI hashes" in other_text
        fresh = engine_for(library, "fresh-home")  # the reference: a new engine, nothing kept
        reference = fresh.generate(GenerationRequest(prompt="a red circle, shinystyle", negative_prompt="badhands",
                                                     model="tiny", sampler="Euler", steps=STEPS, seed=SEED + 1,
                                                     width=SIZE, height=SIZE, watermark=False))
        assert np.array_equal(other_seed, np.asarray(reference.images[0]).astype(int))
        assert reference.infotexts[0].split("Seed:")[1] == other_text.split("Seed:")[1]

        draw("a red circle, shinystyle", clip_skip=2)
        assert len(calls) == 2  # prompt and negative, one chunk each
        shiny = library / "models" / "embeddings" / "shinystyle.pt"
        a1111_pt(shiny, vectors(2, 9) * 0.5)  # the file changes on disk: read again, encoded again
        os.utime(shiny, ns=(time.time_ns(), time.time_ns() + 10**9))
        changed, _ = draw("a red circle, shinystyle")
        assert len(calls) == 4 and np.abs(changed - first).max() > 0
    finally:
        hook.remove()
        a1111_pt(library / "models" / "embeddings" / "shinystyle.pt", vectors(2, 1) * 0.5)  # as the fixture made it
