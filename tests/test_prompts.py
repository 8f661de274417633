"""Prompt weighting and prompts longer than 77 tokens, as A1111 users write them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brushwork import GenerationRequest
from brushwork.engine.prompts import encode, parse_weights, tokenize_weighted


@pytest.mark.parametrize("text,expected", [
    ("a (red:1.5) [cat]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)]),
    ("a ((big)) dog", [("a ", 1.0), ("big", 1.1 * 1.1), (" dog", 1.0)]),
    (r"a \(literal\) x", [("a (literal) x", 1.0)]),
    ("one BREAK two", [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]),
    ("(unclosed", [("unclosed", 1.1)]),
])
def test_weight_syntax(text, expected):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert np.allclose([w for _, w in got], [w for _, w in expected])


@pytest.fixture(scope="module")
def parts(tiny):
    from brushwork.models.load import load_single_file

    return load_single_file(tiny["sd1"]["safetensors"])


def test_plain_prompt_matches_diffusers(parts):
    from diffusers import StableDiffusionPipeline

    ours, _ = encode(parts.text_encoder, parts.tokenizer, "a red circle on the left", "")
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    theirs, _ = pipe.encode_prompt("a red circle on the left", "cpu", 1, False)
    assert ours.shape == (1, 77, 32)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_long_prompts_are_chunked_not_cut(parts):
    long = ", ".join(["a red circle"] * 40)  # 4 tokens each: 159 tokens
    chunks = tokenize_weighted(parts.tokenizer, long)
    assert sum(len(c) for c in chunks) == 159 and len(chunks) == 3
    # as A1111: the second chunk ends at its last comma (2 tokens back), the words after it start the third
    assert [len(c) for c in chunks] == [75, 73, 11]
    assert [len(c) for c in tokenize_weighted(parts.tokenizer, long, comma_padding_backtrack=0)] == [75, 75, 9]
    pos, neg = encode(parts.text_encoder, parts.tokenizer, long, "blurry")
    assert pos.shape == neg.shape == (1, 3 * 77, 32)  # the negative prompt is padded to the same length


def test_weights_and_words_after_token_75_change_the_picture(tiny, engine):
    def image(prompt):
        r = GenerationRequest(prompt=prompt, model=str(tiny["sd1"]["safetensors"]), steps=2, seed=3, width=32,
                              height=32, watermark=False)
        return np.asarray(engine.generate(r).images[0]).astype(int)

    # a 77-token cut would make these pairs pixel-identical
    base = "a cat, " * 40
    assert not np.array_equal(image(base + "green"), image(base + "purple"))
    assert not np.array_equal(image("a (red:1.6) circle"), image("a red circle"))
    assert np.array_equal(image("a (red:1.0) circle"), image("a red circle"))
