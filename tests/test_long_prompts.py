"""Long weighted prompts give A1111's picture (issue 18): its chunks, its weights, its embeddings, its options.

``a1111_chunks`` and ``a1111_embedding`` below are a plain re-statement of what A1111's
``FrozenCLIPEmbedderWithCustomWords`` does with the parsed prompt (the 75-token chunks with their
comma backtrack and ``BREAK``, the per-chunk weighting of the Emphasis option); brushwork must give
the same token ids, the same multipliers and the same tensors.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from brushwork import GenerationRequest
from brushwork.engine.prompts import (
    CHUNK,
    MAX_CHUNKS,
    chunk_inputs,
    encode,
    parse_weights,
    tokenize_weighted,
)
from brushwork.request import InvalidRequest
from serverkit import decode_png, make_home, make_settings, tiny_model_file  # noqa: F401

# ---- the reference ---------------------------------------------------------------------------------------


def a1111_chunks(prompt: str, tokenizer, *, emphasis: str = "Original", backtrack: int = 20):
    """(chunks of 77 token ids, their 77 multipliers), as A1111 cuts ``prompt``."""
    fragments = [(prompt, 1.0)] if emphasis == "None" else parse_weights(prompt)
    comma = tokenizer.get_vocab()[",</w>"]
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks, multipliers = [], []
    tokens, weights, last_comma = [], [], -1

    def finish_chunk():
        nonlocal tokens, weights, last_comma
        fill = CHUNK - len(tokens)
        ids = [start] + tokens + [end] * fill + [end]
        first_end = ids.index(end)
        ids = ids[:first_end + 1] + [pad] * (len(ids) - first_end - 1)  # SD 2 pads with its own token
        chunks.append(ids)
        multipliers.append([1.0] + weights + [1.0] * fill + [1.0])
        tokens, weights, last_comma = [], [], -1

    for text, weight in fragments:
        if text == "BREAK" and weight == -1:
            finish_chunk()
            continue
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if token == comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                keep = last_comma + 1
                moved_tokens, moved_weights = tokens[keep:], weights[keep:]
                tokens, weights = tokens[:keep], weights[:keep]
                finish_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK:
                finish_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        finish_chunk()
    return chunks, multipliers


def a1111_embedding(prompt: str, parts, *, emphasis: str = "Original", backtrack: int = 20, chunks: int = 0):
    """A1111's conditioning for ``prompt``: each chunk encoded alone and weighted alone, then joined; padded
    with the empty prompt's chunk to ``chunks`` chunks (as A1111 pads a shorter prompt or negative prompt)."""
    ids, multipliers = a1111_chunks(prompt, parts.tokenizer, emphasis=emphasis, backtrack=backtrack)
    empty_ids, empty_multipliers = a1111_chunks("", parts.tokenizer)
    while len(ids) < chunks:
        ids, multipliers = ids + empty_ids, multipliers + empty_multipliers
    out = []
    with torch.inference_mode():
        for chunk_ids, chunk_multipliers in zip(ids, multipliers, strict=True):
            z = parts.text_encoder(torch.tensor([chunk_ids]))[0]
            m = torch.tensor([chunk_multipliers])[..., None]
            if emphasis == "Original":
                before = z.mean()
                z = z * m
                z = z * (before / z.mean())
            elif emphasis == "No norm":
                z = z * m
            out.append(z)
    return torch.cat(out, dim=1)


# ---- the prompts -----------------------------------------------------------------------------------------

WORDS = "red circle blue square green triangle white background left right small big".split()


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))  # one token each


PROMPTS = {
    "weights in both chunks": f"a (red circle:1.4) {words(60)} [[blue]] ((square)) {words(30, 3)} (green:0.7) end",
    "a comma 11 tokens before the boundary": f"{words(64)}, {words(30, 5)}",
    "a comma 20 tokens before the boundary": f"{words(55)}, {words(40, 2)}",
    "a comma 21 tokens before the boundary": f"{words(54)}, {words(40, 2)}",
    "a comma right at the boundary": f"{words(74)}, (blue:1.2) {words(10)}",
    "BREAK": f"(red:1.2) circle BREAK blue square BREAK BREAK {words(80)} BREAK",
    "BREAK first": "BREAK a (blue:1.3) square",
    "an unbalanced bracket": f"a ((red circle, {words(70)}, [blue square {words(20)}",
    "brackets across the boundary": f"{words(70)} (one two three four five six seven eight:1.3) nine",
}


@pytest.fixture(scope="module")
def sd1(tiny):
    from brushwork.models.load import load_single_file

    return load_single_file(tiny["sd1"]["safetensors"])


@pytest.fixture(scope="module")
def sd2(tiny):
    from brushwork.models.load import load_single_file

    return load_single_file(tiny["sd2"]["safetensors"], prediction="eps")


def ours(prompt, tokenizer, **options):
    return chunk_inputs(tokenizer, tokenize_weighted(tokenizer, prompt, **options))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_long_prompts_are_cut_into_a1111s_chunks_with_a1111s_weights(sd1, name):
    prompt = PROMPTS[name]
    ids, multipliers = ours(prompt, sd1.tokenizer)
    ref_ids, ref_multipliers = a1111_chunks(prompt, sd1.tokenizer)
    assert len(ids) >= 2
    assert ids == ref_ids
    assert multipliers == ref_multipliers
    z, _ = encode(sd1.text_encoder, sd1.tokenizer, prompt, "")
    assert torch.equal(z, a1111_embedding(prompt, sd1))


def test_the_words_after_a_near_comma_move_to_the_next_chunk(sd1):
    prompt = PROMPTS["a comma 11 tokens before the boundary"]
    lengths = [len(c) for c in tokenize_weighted(sd1.tokenizer, prompt)]
    assert lengths == [65, 30]  # 64 words and the comma; the 10 words after it went on with the rest
    assert [len(c) for c in tokenize_weighted(sd1.tokenizer, prompt, comma_padding_backtrack=0)] == [75, 20]
    assert [len(c) for c in tokenize_weighted(sd1.tokenizer, prompt, comma_padding_backtrack=10)] == [75, 20]
    far = PROMPTS["a comma 21 tokens before the boundary"]
    assert [len(c) for c in tokenize_weighted(sd1.tokenizer, far)] == [75, 20]  # more than 20 back: no move
    for backtrack in (0, 5, 11, 74):
        assert ours(prompt, sd1.tokenizer, comma_padding_backtrack=backtrack) == \
            a1111_chunks(prompt, sd1.tokenizer, backtrack=backtrack)


def test_break_ends_a_chunk_even_an_empty_one(sd1):
    lengths = [len(c) for c in tokenize_weighted(sd1.tokenizer, "BREAK a (blue:1.3) square")]
    assert lengths == [0, 3]  # as A1111: BREAK first gives an empty first chunk
    assert [len(c) for c in tokenize_weighted(sd1.tokenizer, "a BREAK BREAK b")] == [1, 0, 1]
    assert [len(c) for c in tokenize_weighted(sd1.tokenizer, "a BREAK")] == [1]  # nothing after: no chunk


@pytest.mark.parametrize("emphasis", ["No norm", "None", "Ignore"])
@pytest.mark.parametrize("name", ["weights in both chunks", "an unbalanced bracket", "BREAK"])
def test_every_emphasis_option_gives_a1111s_embedding(sd1, emphasis, name):
    prompt = PROMPTS[name]
    assert ours(prompt, sd1.tokenizer, emphasis=emphasis) == a1111_chunks(prompt, sd1.tokenizer, emphasis=emphasis)
    z, _ = encode(sd1.text_encoder, sd1.tokenizer, prompt, "", emphasis=emphasis)
    assert torch.equal(z, a1111_embedding(prompt, sd1, emphasis=emphasis))


def test_emphasis_options_differ_as_a1111s_do(sd1):
    prompt = PROMPTS["weights in both chunks"]
    z = {e: encode(sd1.text_encoder, sd1.tokenizer, prompt, "", emphasis=e)[0] for e in
         ("Original", "No norm", "Ignore", "None")}
    assert not torch.equal(z["Original"], z["No norm"])
    assert not torch.equal(z["Original"], z["Ignore"])
    assert not torch.equal(z["Ignore"], z["None"])  # None reads "(red circle:1.4)" as text, brackets and all
    ids, multipliers = ours(prompt, sd1.tokenizer, emphasis="None")
    assert all(m == 1.0 for row in multipliers for m in row)
    assert sd1.tokenizer.convert_tokens_to_ids("(</w>") in ids[0] + ids[1]
    assert ours(prompt, sd1.tokenizer, emphasis="Ignore")[1] == ours(prompt, sd1.tokenizer)[1]  # read, not applied
    with pytest.raises(InvalidRequest, match="unknown emphasis 'Loud'; choose one of: None, Ignore, Original"):
        encode(sd1.text_encoder, sd1.tokenizer, prompt, "", emphasis="Loud")


def test_the_mean_is_restored_chunk_by_chunk(sd1):
    prompt = PROMPTS["weights in both chunks"]
    z, _ = encode(sd1.text_encoder, sd1.tokenizer, prompt, "")
    plain, _ = encode(sd1.text_encoder, sd1.tokenizer, prompt, "", emphasis="Ignore")
    for k in range(z.shape[1] // 77):
        chunk = slice(77 * k, 77 * (k + 1))
        assert torch.allclose(z[:, chunk].mean(), plain[:, chunk].mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["weights in both chunks", "a comma 11 tokens before the boundary", "BREAK"])
def test_sd2_uses_its_own_tokenizer_and_padding_and_gives_a1111s_embedding(sd2, name):
    prompt = PROMPTS[name]
    ids, multipliers = ours(prompt, sd2.tokenizer)
    assert sd2.tokenizer.pad_token_id != sd2.tokenizer.eos_token_id
    assert (ids, multipliers) == a1111_chunks(prompt, sd2.tokenizer)
    z, _ = encode(sd2.text_encoder, sd2.tokenizer, prompt, "")
    assert torch.equal(z, a1111_embedding(prompt, sd2))


def test_a_short_plain_prompt_is_still_exactly_diffusers(sd1, sd2):
    from diffusers import StableDiffusionPipeline

    for parts in (sd1, sd2):
        pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=parts.unet, scheduler=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        theirs, _ = pipe.encode_prompt("a red circle, on the left", "cpu", 1, False)
        mine, _ = encode(parts.text_encoder, parts.tokenizer, "a red circle, on the left", "")
        assert torch.equal(mine, theirs)


def test_a_long_weighted_prompt_draws_a1111s_picture(tiny, engine, sd1):
    """The picture equals plain diffusers run with A1111's conditioning (computed by the reference above)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    prompt, negative = PROMPTS["weights in both chunks"] + ", " + words(70, 1), "blurry, (ugly:1.2)"
    seed, steps, size = 11, 3, 32
    result = engine.generate(GenerationRequest(prompt=prompt, negative_prompt=negative, model=str(tiny["sd1"]["safetensors"]),
                                               sampler="Euler", steps=steps, cfg_scale=7.0, seed=seed, width=size,
                                               height=size, watermark=False))
    k = len(a1111_chunks(prompt, sd1.tokenizer)[0])
    assert k == 3
    cond = a1111_embedding(prompt, sd1, chunks=k)
    uncond = a1111_embedding(negative, sd1, chunks=k)
    pipe = StableDiffusionPipeline(vae=sd1.vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer, unet=sd1.unet,
                                   scheduler=EulerDiscreteScheduler.from_config(sd1.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(sd1.vae.config.block_out_channels) - 1)  # the tiny VAE's; 8 for SD's
    latents = torch.randn((1, 4, size // factor, size // factor), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.inference_mode():
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=7.0,
                      latents=latents, height=size, width=size).images[0]
    diff = np.abs(np.asarray(result.images[0]).astype(int) - np.asarray(theirs).astype(int))
    assert diff.max() == 0


# ---- the request, the infotext, the APIs -----------------------------------------------------------------


def test_emphasis_and_comma_backtrack_are_checked_with_one_line_errors():
    assert GenerationRequest(emphasis="no norm").validate().emphasis == "No norm"
    with pytest.raises(InvalidRequest, match="unknown emphasis 'Strong'; choose one of: None, Ignore, Original, No norm"):
        GenerationRequest(emphasis="Strong").validate()
    for bad in (-1, 75, 2.5, True):
        with pytest.raises(InvalidRequest, match="comma padding backtrack"):
            GenerationRequest(comma_padding_backtrack=bad).validate()
    assert GenerationRequest(comma_padding_backtrack=0).validate().comma_padding_backtrack == 0
    again = GenerationRequest.from_dict(GenerationRequest(emphasis="None", comma_padding_backtrack=3).to_dict())
    assert (again.emphasis, again.comma_padding_backtrack) == ("None", 3)


def test_no_norm_goes_into_the_infotext_and_remakes_the_same_picture(tiny, engine):
    from brushwork.output.infotext import request_from_infotext

    base = dict(prompt="a (red:1.5) circle, [blue] square", model=str(tiny["sd1"]["safetensors"]), steps=2, seed=4,
                width=32, height=32, watermark=False)
    no_norm = engine.generate(GenerationRequest(**base, emphasis="No norm"))
    original = engine.generate(GenerationRequest(**base))
    text = no_norm.infotexts[0]
    assert "Emphasis: No norm" in text.splitlines()[-1]
    assert "Emphasis" not in original.infotexts[0]  # A1111 writes it only when it is not the default
    kwargs = request_from_infotext(text)
    assert kwargs["emphasis"] == "No norm"
    assert request_from_infotext(original.infotexts[0])["emphasis"] == "Original"
    kwargs["model"] = base["model"]
    again = engine.generate(GenerationRequest(**kwargs, watermark=False))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(no_norm.images[0]))
    assert not np.array_equal(np.asarray(original.images[0]), np.asarray(no_norm.images[0]))


def test_the_command_line_takes_both_options(tiny, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from brushwork.cli import main

    args = ["txt2img", "a (red:1.4) circle", "--model", str(tiny["sd1"]["safetensors"]), "--steps", "2", "-W", "32",
            "-H", "32", "--seed", "1", "--outdir", str(tmp_path), "--skip-grid", "-q"]
    result = CliRunner().invoke(main, [*args, "--emphasis", "No norm", "--comma-padding-backtrack", "0"])
    assert result.exit_code == 0, result.output
    assert "Emphasis: No norm" in Image.open(result.stdout.split()[0]).info["parameters"]
    bad = CliRunner().invoke(main, [*args, "--emphasis", "Loud"])
    assert bad.exit_code != 0 and "unknown emphasis 'Loud'; choose one of: None, Ignore, Original, No norm" in bad.output
    bad = CliRunner().invoke(main, [*args, "--comma-padding-backtrack", "80"])
    assert bad.exit_code != 0 and "comma padding backtrack must be between 0 and 74" in bad.output


@pytest.fixture(scope="module")
def client(tiny_model_file, tmp_path_factory):  # noqa: F811
    from fastapi.testclient import TestClient

    from brushwork.engine.core import Engine
    from brushwork.server.app import create_app

    paths = make_home(tmp_path_factory.mktemp("emphasis"), tiny_model_file, "tiny")
    settings = make_settings(paths)
    app = create_app(Engine(settings), settings)
    with TestClient(app) as c:
        yield c


def test_the_sdapi_emphasis_option_changes_the_picture(client):
    body = {"prompt": "a (red:1.6) circle, [[blue]] square", "seed": 3, "width": 32, "height": 32, "steps": 2,
            "sampler_name": "Euler"}

    def picture(**extra):
        r = client.post("/sdapi/v1/txt2img", json={**body, **extra})
        assert r.status_code == 200, r.text
        image = decode_png(r.json()["images"][0])
        return np.asarray(image.convert("RGB")), image.info["parameters"]

    original, text = picture()
    assert "Emphasis" not in text
    no_norm, text = picture(override_settings={"emphasis": "No norm"})
    assert "Emphasis: No norm" in text
    assert not np.array_equal(original, no_norm)
    assert client.get("/sdapi/v1/options").json()["emphasis"] == "Original"
    assert client.post("/sdapi/v1/options", json={"emphasis": "No norm"}).status_code == 200
    try:
        assert client.get("/sdapi/v1/options").json()["emphasis"] == "No norm"
        from_options, text = picture()
        assert np.array_equal(from_options, no_norm) and "Emphasis: No norm" in text
        back, _ = picture(override_settings={"emphasis": "Original"})  # a request's override wins
        assert np.array_equal(back, original)
    finally:
        client.post("/sdapi/v1/options", json={"emphasis": "Original"})
    r = client.post("/sdapi/v1/options", json={"emphasis": "Loud"})
    assert r.status_code in (400, 422) and "unknown emphasis" in r.text
    r = client.post("/sdapi/v1/options", json={"comma_padding_backtrack": 75})
    assert r.status_code in (400, 422) and "comma_padding_backtrack" in r.text


def test_the_sdapi_comma_padding_backtrack_option_changes_the_picture(client):
    prompt = PROMPTS["a comma 11 tokens before the boundary"]
    body = {"prompt": prompt, "seed": 3, "width": 32, "height": 32, "steps": 2, "sampler_name": "Euler"}
    assert client.get("/sdapi/v1/options").json()["comma_padding_backtrack"] == 20
    images = []
    for backtrack in (20, 0):
        r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"comma_padding_backtrack": backtrack}})
        assert r.status_code == 200, r.text
        images.append(np.asarray(decode_png(r.json()["images"][0]).convert("RGB")))
    assert not np.array_equal(*images)
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"comma_padding_backtrack": 99}})
    assert r.status_code in (400, 422) and "comma padding backtrack" in r.text


def test_the_native_api_takes_both_fields(client):
    r = client.post("/api/v1/jobs", json={"prompt": "a (red:1.2) circle", "emphasis": "No norm",
                                          "comma_padding_backtrack": 0, "steps": 1, "width": 32, "height": 32})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["emphasis"] == "No norm" and r.json()["request"]["comma_padding_backtrack"] == 0
    r = client.post("/api/v1/jobs", json={"prompt": "x", "emphasis": "Loud"})
    assert r.status_code in (400, 422) and "unknown emphasis" in r.text


# ---- bounds -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [":" + "1" * 1_000_000, " " * 1_000_000, "(" * 500_000, "(a:" * 300_000,
                                  "(a" * 250_000 + ")" * 250_000, "[" * 500_000, ")" * 1_000_000, "\\" * 1_000_000,
                                  ": " * 500_000, "(a:1.1)" * 70_000, "(a)b(" * 100_000, "a BREAK " * 120_000],
                         ids=lambda t: repr(t[:6]))
def test_a_megabyte_of_brackets_digits_or_spaces_is_parsed_within_a_second(text):
    started = time.process_time()  # this process's time: another process on the machine does not count
    parts = parse_weights(text)
    assert time.process_time() - started < 1.0  # a quadratic parse takes minutes here
    assert parts


def test_a_prompt_over_15000_tokens_is_refused_without_tokenizing_the_rest(sd1):
    class Counting:  # the tokenizer, counting the characters it is given
        def __init__(self, tokenizer):
            self.tokenizer, self.chars = tokenizer, 0

        def __call__(self, text, **kwargs):
            self.chars += len(text)
            return self.tokenizer(text, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    assert len(tokenize_weighted(sd1.tokenizer, "a " * (MAX_CHUNKS * CHUNK))) == MAX_CHUNKS
    with pytest.raises(InvalidRequest) as err:
        tokenize_weighted(sd1.tokenizer, "a " * (MAX_CHUNKS * CHUNK + 1))
    assert str(err.value) == "the prompt is too long: more than 15000 tokens (200 chunks of 75); shorten it"
    counting = Counting(sd1.tokenizer)
    with pytest.raises(InvalidRequest, match="too long"):
        tokenize_weighted(counting, "cat " * 250_000)  # one fragment of a million characters
    assert counting.chars < 100_000
    counting = Counting(sd1.tokenizer)
    with pytest.raises(InvalidRequest, match="too long"):
        tokenize_weighted(counting, "(cat:1.1) " * 100_000)  # a hundred thousand fragments
    assert counting.chars < 100_000
    with pytest.raises(InvalidRequest, match="too long"):
        tokenize_weighted(sd1.tokenizer, "BREAK " * (MAX_CHUNKS + 1))


def test_a_long_fragment_is_tokenized_as_a_whole_would_be(sd1):
    text = " ".join(f"{WORDS[i % 12]}{i},élan 's don't 🐱 3.5kg!!" for i in range(700))  # about 23000 characters
    assert len(text) > 2 * 8192
    whole = sd1.tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [t for chunk in tokenize_weighted(sd1.tokenizer, text, comma_padding_backtrack=0) for t, _ in chunk]
    assert pieces == whole[:len(pieces)] and len(pieces) == len(whole)
