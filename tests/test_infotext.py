"""The A1111 'parameters' text: written as A1111 writes it, read back by us (and by A1111's rules)."""

from __future__ import annotations

from brushwork.output.infotext import format_infotext, parse_infotext, request_from_infotext


def test_written_exactly_as_a1111_writes_it():
    text = format_infotext(
        "a hamster, painting\nwith a brush",
        "blurry",
        {"Steps": 20, "Sampler": "Euler a", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 123,
         "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Denoising strength": 0.75,
         "Clip skip": None, "Lora hashes": "a: 0123456789ab, b: ba9876543210", "Version": "brushwork 0.1.0"},
    )
    assert text == (
        "a hamster, painting\nwith a brush\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, "
        'Lora hashes: "a: 0123456789ab, b: ba9876543210", Version: brushwork 0.1.0'
    )


def test_no_negative_line_when_empty_and_key_order_is_a1111s():
    text = format_infotext("cat", "", {"Seed": 1, "Steps": 5, "Sampler": "DDIM", "CFG scale": 7.5, "Version": "v"})
    assert text == "cat\nSteps: 5, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Version: v"


def test_round_trip():
    text = format_infotext("a: b, c", "neg, ative", {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7, "Seed": 5,
                                                     "Size": "64x48", "Model": 'odd, "name"'})
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a: b, c" and parsed["Negative prompt"] == "neg, ative"
    assert parsed["Model"] == 'odd, "name"' and parsed["Size"] == "64x48" and parsed["Seed"] == "5"
    kw = request_from_infotext(text)
    assert kw["width"] == 64 and kw["height"] == 48 and kw["seed"] == 5 and kw["sampler"] == "DPM++ 2M"


def test_old_combined_sampler_names_are_split():
    parsed = parse_infotext("x\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512")
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"


def test_a_prompt_alone_has_no_parameters():
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
