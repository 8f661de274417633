"""The A1111 "parameters" text: write it exactly as A1111 does, and read it back.

Layout: the prompt (may span lines); ``Negative prompt: ...`` only when set; then one line of
``Key: value`` pairs joined by ``, `` in A1111's key order. Values holding ``,`` ``:`` or a
newline are JSON-quoted.
"""

from __future__ import annotations

import json
import re

KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Init image hash", "RNG", "Tiling",
)

def _is_word(ch: str) -> bool:  # the regular expression ``\w`` for str
    return ch.isalnum() or ch == "_"


def _is_key(ch: str) -> bool:  # ``[\w \-/]``
    return ch in " -/" or ch.isalnum() or ch == "_"


def scan_params(line: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of an infotext's last line, in one pass (linear in the line's length).

    Finds what A1111's pattern ``\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`` finds with
    ``findall``, whose backtracking takes quadratic time on a long run of key characters without a ``:``
    (100k characters: 96 s). Keys keep their surrounding spaces, values their quotes, as the pattern's groups.
    """
    out: list[tuple[str, str]] = []
    n, pos = len(line), 0
    while pos < n:
        i = pos
        while i < n and line[i].isspace():
            i += 1
        if i == n:
            break
        if not _is_word(line[i]):
            pos = i + 1  # no match starts anywhere in pos..i
            continue
        j = i + 1
        while j < n and _is_key(line[j]):
            j += 1
        if j == n or line[j] != ":":
            pos = j  # every start in pos..j-1 runs into the same non-key character
            continue
        k = j + 1
        while k < n and line[k].isspace():
            k += 1
        end = _quoted_end(line, k)
        if end is not None and (end == n or line[end] == ","):
            value, pos = line[k:end], end + 1
        else:
            comma = line.find(",", k)
            comma = n if comma < 0 else comma
            value, pos = line[k:comma], comma + 1
        out.append((line[i:j], value))
    return out


def _quoted_end(line: str, k: int) -> int | None:
    """Where a ``"..."`` value starting at ``k`` ends (just after its closing quote), or None."""
    n = len(line)
    if k >= n or line[k] != '"':
        return None
    m = k + 1
    while m < n:
        ch = line[m]
        if ch == "\\":
            if m + 1 >= n or line[m + 1] == "\n":
                return None
            m += 2
        elif ch == '"':
            return m + 1 if m > k + 1 else None
        else:
            m += 1
    return None


def quote(value) -> str:
    text = str(value)
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """``params`` maps A1111 keys to values; None values are left out; unknown keys go after the known ones."""
    ordered = [k for k in KEY_ORDER if k in params] + [k for k in params if k not in KEY_ORDER and k != "Version"]
    if "Version" in params:
        ordered.append("Version")
    pairs = [f"{k}: {quote(_number(params[k]))}" for k in ordered if params[k] is not None]
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_infotext(text: str) -> dict:
    """A1111-style parse: {"Prompt", "Negative prompt", and every Key: value}; numbers stay strings.

    A combined sampler name ("DPM++ 2M Karras") is split into Sampler + Schedule type, as A1111 does.
    """
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    last = lines[-1] if lines else ""
    pairs = scan_params(last)
    if len(pairs) >= 3:
        for key, value in pairs:
            params[key.strip()] = _unquote(value)
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    result.update(params)
    sampler = result.get("Sampler", "")
    if sampler and "Schedule type" not in result:
        for schedule in ("Karras", "Exponential"):
            if sampler.endswith(" " + schedule):
                result["Sampler"] = sampler[: -len(schedule) - 1]
                result["Schedule type"] = schedule
    return result


def request_from_infotext(text: str, loras=None) -> dict:
    """Keyword arguments for ``GenerationRequest`` that reproduce the image this infotext describes. With ``loras``
    (a ``models.loras.LoraLibrary``) a ``<lora:name:...>`` tag whose name finds no file of the library names the
    file whose hash ``Lora hashes`` gives for it (as A1111 reads a pasted infotext)."""
    p = parse_infotext(text)
    out: dict = {"prompt": p.get("Prompt", ""), "negative_prompt": p.get("Negative prompt", "")}
    if loras is not None and p.get("Lora hashes"):
        from ..models.loras import with_names_from_hashes

        out["prompt"] = with_names_from_hashes(out["prompt"], p["Lora hashes"], loras)
    conv = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
            "Sampler": ("sampler", str), "Schedule type": ("scheduler", str),
            "Denoising strength": ("strength", float), "Clip skip": ("clip_skip", int), "Model": ("model", str),
            "Token merging ratio": ("token_merging_ratio", float), "CFG end": ("cfg_end", float),
            "Emphasis": ("emphasis", str), "Mask blur": ("mask_blur", int), "Eta": ("eta", float),
            "Masked area padding": ("inpaint_full_res_padding", int), "Masked content": ("inpainting_fill", str),
            # the x4 upscaler's (brushwork's keys; A1111 has no such model)
            "Noise level": ("noise_level", int), "Tile size": ("tile_size", int), "Tile overlap": ("tile_overlap", int),
            "Refiner": ("refiner", str), "Refiner switch at": ("refiner_switch_at", float)}
    _convert(p, conv, out)
    out.setdefault("cfg_end", 1.0)  # written whenever CFG ended early: without it, every step had CFG
    out.setdefault("emphasis", "Original")  # as A1111: written only when not the default
    if "Inpaint area" in p or "Masked content" in p or "Mask mode" in p:  # A1111 writes each only when not the default
        out["inpaint_full_res"] = p.get("Inpaint area") == "Only masked"
        out["inpainting_mask_invert"] = p.get("Mask mode") == "Inpaint not masked"
        out.setdefault("inpainting_fill", "original")
    if p.get("Fast mode", "").isdigit() and len(p["Fast mode"]) <= 3:
        out["fast"] = int(p["Fast mode"])  # brushwork's DeepCache interval
    if any(key.startswith("Hires ") for key in p):  # A1111's hires fix: its denoising strength is the second pass's
        _hires_from_infotext(p, out)
    if "Size" in p and re.fullmatch(r"\d+x\d+", p["Size"]):
        w, h = p["Size"].split("x")
        out["width"], out["height"] = int(w), int(h)
    return out


def _convert(p: dict, conv: dict, out: dict) -> None:
    """``out[name] = cast(p[key])`` for each ``key: (name, cast)`` present; a value that does not convert is left
    out (the request's default applies), as A1111 does."""
    for key, (name, cast) in conv.items():
        if key in p:
            try:
                out[name] = cast(p[key])
            except ValueError:
                pass


def _hires_from_infotext(p: dict, out: dict) -> None:
    """The hires fix's keys (``Size`` is the first pass's size, as A1111 writes it)."""
    conv = {"Hires upscale": ("hires_scale", float), "Hires steps": ("hires_steps", int),
            "Hires upscaler": ("hires_upscaler", str), "Hires sampler": ("hires_sampler", str),
            "Hires schedule type": ("hires_scheduler", str), "Hires checkpoint": ("hires_checkpoint", str),
            "Hires prompt": ("hires_prompt", str), "Hires negative prompt": ("hires_negative_prompt", str)}
    _convert(p, conv, out)
    if out.get("hires_checkpoint") == "Use same checkpoint":  # what A1111's UI shows for none
        del out["hires_checkpoint"]
    if re.fullmatch(r"\d+x\d+", p.get("Hires resize", "")):
        x, y = p["Hires resize"].split("x")
        out["hires_resize_x"], out["hires_resize_y"] = int(x), int(y)
    if "strength" in out:
        out["hires_strength"] = out.pop("strength")
    if "hires_resize_x" not in out:
        out.setdefault("hires_scale", 2.0)  # A1111's default hr_scale
