"""The extra networks of one request, as A1111's: the LoRAs its prompt's tags name, and the textual-inversion
embeddings its prompts can use.

``<lora:name>``, ``<lora:name:0.8>``, ``<lora:name:te:unet>`` (A1111's order: the text encoder's strength, then
the UNet's, which is the first one where it is not given; ``te=``/``unet=`` by name too), several at once; ``lyco``
is the same tag. Every ``<kind:...>`` tag is removed from the prompt before it is read (A1111's
``extra_networks.parse_prompt``); the negative prompt is read as it is, as A1111 does. The infotext keeps the
tags and adds ``Lora hashes`` (and ``TI hashes`` for the embeddings the prompts used). The hires fix's own prompt
brings its own tags for the second pass (A1111's ``hr_prompt``). The same LoRA named twice adds its strengths.

The engine makes one ``Networks`` per request: ``prepare`` (before the run: names resolved, files loaded, errors
raised), ``activate`` (from ``RunContext.embeddings``, per prompt), ``release`` (after the run, in ``finally``:
the model is again exactly as loaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidRequest
from . import lora as lora_mod
from . import lycoris
from .prompts import extra_network_spans

LORA_KINDS = ("lora", "lyco")  # A1111 registers "lyco" as another name of "lora"


@dataclass(frozen=True)
class LoraTag:
    name: str  # as the tag writes it (A1111's "mentioned name": the infotext's)
    te: float
    unet: float


def lora_tags(prompt: str) -> tuple[list[LoraTag], list[str]]:
    """The LoRA tags of a prompt, and the kinds of tag found that brushwork does not apply (``hypernet``)."""
    tags, other = [], []
    for _, _, kind, args in extra_network_spans(prompt):
        if kind.lower() not in LORA_KINDS:
            if kind not in other:
                other.append(kind)
            continue
        positional, named = [], {}
        for item in args:
            parts = item.split("=", 2)  # as A1111's ExtraNetworkParams: "key=value" is named
            if len(parts) == 2:
                named[parts[0].strip()] = parts[1]
            else:
                positional.append(item)
        if not positional or not positional[0].strip():
            raise InvalidRequest(f"the tag <{kind}:{':'.join(args)}> names no LoRA; write <lora:name:0.8>")
        name = positional[0].strip()
        te = _strength(positional[1], name) if len(positional) > 1 else 1.0
        te = _strength(named["te"], name) if "te" in named else te
        unet = _strength(positional[2], name) if len(positional) > 2 else te
        unet = _strength(named["unet"], name) if "unet" in named else unet
        tags.append(LoraTag(name, te, unet))
    return tags, other


def _strength(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidRequest(f"the LoRA tag for {name!r} has strength {text.strip()[:40]!r}, which is not a number; "
                             f"write <lora:{name}:0.8>")
    return value


def request_prompts(request) -> list[str]:
    """The prompts whose tags a request applies: the prompt, and the hires fix's own."""
    texts = [request.prompt]
    if getattr(request, "hires_enabled", False) and request.hires_prompt and request.hires_prompt != request.prompt:
        texts.append(request.hires_prompt)
    return texts


def check_loras(request, library) -> None:
    """InvalidRequest for a LoRA tag that names no file of ``library`` or has a bad strength (what the server
    checks before it accepts a job); the files themselves are read when the job runs."""
    files = None
    for text in request_prompts(request):
        for tag in lora_tags(text)[0]:
            files = library.files() if files is None else files
            if library.find(tag.name, files) is None:
                raise InvalidRequest(_not_found(tag.name, library))


def _not_found(name: str, library) -> str:
    return f"LoRA {name!r} not found in the library's lora/ folder (has: {library.names()})"


class Networks:
    """One request's LoRAs and embeddings on one loaded model (``loras``: a ``models.loras.LoraLibrary``,
    ``embedding_library``: a ``models.embeddings.EmbeddingLibrary``; either None: none of that kind)."""

    def __init__(self, parts, request, loras=None, embedding_library=None):
        self.parts, self.request = parts, request
        self.loras, self.embedding_library = loras, embedding_library
        self.notes: list[str] = []
        self.embeddings = embedding_library.for_model(parts) if embedding_library is not None else None
        self._others: dict[int, tuple] = {}  # id(another model's parts: SDXL's refiner) -> (parts, its embeddings)
        # prompt -> [(adapter name, or a lycoris.Network, te strength, unet strength)]
        self._plans: dict[str, list[tuple]] = {}
        self._mentioned: dict[str, object] = {}  # name as written -> LoraFile, in order (the infotext's)
        self._active: tuple | None = None  # what apply() last set; None: not set by this request
        self._hooks = lycoris.Hooks()  # LyCORIS LoHa / LoKr files: forward hooks, while active
        self._children: dict[int, Networks] = {}  # id(another model's parts: the hires checkpoint) -> its Networks

    def for_model(self, parts) -> Networks:
        """The request's LoRAs and embeddings on another loaded model that runs part of it from the same prompts:
        the hires checkpoint, as A1111 activates the extra networks again on the checkpoint it switches to. Its
        notes are this one's; its embeddings' hashes join this one's infotext; ``release`` releases it too."""
        if parts is self.parts:
            return self
        child = self._children.get(id(parts))
        if child is None:
            child = self._children[id(parts)] = Networks(parts, self.request, self.loras, self.embedding_library)
            child.notes = self.notes
        return child

    def embeddings_for(self, parts):
        """The embeddings a model's prompt encoding can use: this model's, or for another model the request runs
        (SDXL's refiner) those with vectors for its text encoder (an SDXL file's ``clip_g`` for the refiner's bigG,
        as ComfyUI's refiner reads it; A1111 skips the file there, so the name's words would be read as text).
        LoRAs apply to the model only (``refiner_note``)."""
        if parts is self.parts or self.embedding_library is None:
            return self.embeddings if parts is self.parts else None
        if id(parts) not in self._others:
            self._others[id(parts)] = (parts, self.embedding_library.for_model(parts, every=False))
        return self._others[id(parts)][1]

    def refiner_note(self) -> None:
        """Say, once, that the request's LoRAs stay off for the refiner's steps: its UNet and its one text encoder
        have other shapes than the SDXL base's a LoRA is made for (A1111 counts them as errors)."""
        self.other_model_note("the refiner (an SDXL LoRA does not fit the refiner's layers)")

    def other_model_note(self, what: str) -> None:
        """Say, once, that the request's LoRAs stay off for ``what`` another loaded model runs (the refiner's
        steps): they are loaded into the model's layers only."""
        if any(plan for plan in self._plans.values()):
            note = f"LoRAs apply to the model, not to {what}"
            if note not in self.notes:
                self.notes.append(note)

    def prepare(self) -> None:
        """Find and load every LoRA the request's prompts name (errors now, before any step runs)."""
        keep = []
        for text in request_prompts(self.request):
            keep += [name for name, _, _ in self._plan(text, keep=tuple(keep)) if isinstance(name, str)]

    def _plan(self, prompt: str, keep: tuple[str, ...] = ()) -> list[tuple]:
        if prompt in self._plans:
            return self._plans[prompt]
        tags, other = lora_tags(prompt)
        for kind in other:
            note = f"<{kind}:...> tags are A1111 extra networks brushwork does not have; removed from the prompt"
            if note not in self.notes:
                self.notes.append(note)
        plan: list[tuple] = []
        if tags and self.loras is None:
            raise InvalidRequest("this engine has no LoRA library; remove the <lora:...> tags")
        files = self.loras.files() if tags else []
        for tag in tags:
            found = self.loras.find(tag.name, files)
            if found is None:
                raise InvalidRequest(_not_found(tag.name, self.loras))
            self._mentioned.setdefault(tag.name, found)
            if tag.te == 0 and tag.unet == 0:
                continue  # A1111 lists it in the infotext; it changes nothing
            planned = tuple(a for a, _, _ in plan if isinstance(a, str))
            adapter, note = lora_mod.load(self.parts, found, keep=(*keep, *planned))
            if note and note not in self.notes:
                self.notes.append(note)
            plan.append((adapter, tag.te, tag.unet))
        self._plans[prompt] = plan
        return plan

    def activate(self, prompt: str) -> None:
        """The LoRAs this prompt's tags name on, at their strengths; every other adapter off."""
        plan = tuple(self._plan(prompt))
        if plan != self._active:
            adapters = [use for use in plan if isinstance(use[0], str)]
            if adapters or lora_mod.loaded(self.parts):
                lora_mod.apply(self.parts, adapters)
            self._hooks.remove()
            self._hooks.attach([use for use in plan if not isinstance(use[0], str)])
            self._active = plan

    @property
    def changes_unet(self) -> bool:
        """Whether the LoRAs now on change the UNet (a CPU backend's converted UNet has the plain weights)."""
        return any(unet != 0 for _, _, unet in self._active or ())

    @property
    def changes_text_encoder(self) -> bool:
        """Whether the LoRAs now on change the text encoders (a converted text encoder has the plain weights)."""
        return any(te != 0 for _, te, _ in self._active or ())

    def release(self) -> None:
        """Every adapter off again (the model as loaded, and every other model this request ran), whatever the run
        did."""
        for child in self._children.values():
            child.release()
        self._hooks.remove()
        if lora_mod.loaded(self.parts):
            lora_mod.disable(self.parts)
        self._active = None

    def infotext(self) -> dict:
        """A1111's ``Lora hashes`` and ``TI hashes`` keys (None where there is nothing to say)."""
        loras = []
        for name, found in self._mentioned.items():
            loras.append(f"{name.replace(':', '').replace(',', '')}: {self.loras.hash(found)[:12]}")
        used = dict(self.embeddings.used) if self.embeddings is not None else {}
        others = [other for _, other in self._others.values()]  # the refiner's encoding, after the model's
        others += [child.embeddings for child in self._children.values() if child.embeddings is not None]
        for other in others:  # (and the hires checkpoint's)
            used.update({name: e for name, e in other.used.items() if name not in used})
        embeddings = [f"{name.replace(':', '').replace(',', '')}: {self.embedding_library.hash(e)[:12]}"
                      for name, e in used.items()]
        return {"Lora hashes": ", ".join(loras) or None, "TI hashes": ", ".join(embeddings) or None}
