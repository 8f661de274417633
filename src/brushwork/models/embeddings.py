"""Textual-inversion embeddings of the library's ``embeddings/`` folder, read as A1111 reads them
(``modules/textual_inversion/textual_inversion.py``).

- The name is the file name without its extension; a prompt uses it as a word: where the token ids of the
  name stand in a prompt, the embedding's vectors take their places (``engine/prompts.py``).
- Formats: ``.pt`` / ``.bin`` with ``string_to_param`` (A1111's own training: ``{'*': tensor}``), one tensor
  (``.safetensors`` with ``emb_params``, diffusers' ``learned_embeds.bin`` with ``{'<token>': tensor}``), and
  SDXL's ``clip_l`` + ``clip_g``. Pickles are read with ``torch.load(weights_only=True)``: one that wants to run
  code is refused.
- An embedding fits a model when its width (``shape``: SDXL's is 768 + 1280) is the model's text encoder width;
  the others are "skipped" (``/sdapi/v1/embeddings``), and their names are plain words for that model.
- Its hash (``TI hashes`` in the infotext) is the first 12 hex digits of the file's sha256.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from .store import EMBEDDING_FOLDERS, ModelStore

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SDXL_ENCODERS = ("clip_l", "clip_g")  # SDXL's two text encoders, as its embedding files name them
MAX_VECTORS = 75  # a chunk's tokens: an embedding is kept within one chunk


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: dict  # "" (one text encoder's), or SDXL's "clip_l" and "clip_g" -> (count, width) float32 tensor
    count: int  # A1111's "vectors": how many tokens it stands for
    shape: int  # A1111's "shape": its width (SDXL: both encoders' side by side)
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    sha256: str | None = None

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:12] if self.sha256 else None

    def vectors_for(self, encoder: str = ""):
        """The vectors for a text encoder: "" (SD 1.x / 2.x), "clip_l" or "clip_g" (SDXL's two)."""
        return self.vectors[""] if "" in self.vectors else self.vectors[encoder]

    def fits(self, encoders: list[tuple[str, int]], *, every: bool = True) -> bool:
        """Whether a model with these text encoders ((kind, width) each: ``text_encoders``) takes it: A1111's
        width check (its "shape" is the encoders' widths side by side), each encoder finding its own vectors.
        ``every=False``: its vectors for these encoders suffice (SDXL's refiner reading an SDXL file's ``clip_g``
        during a base model's run, as ComfyUI's refiner CLIP does; A1111 skips the file there)."""
        if "" in self.vectors:
            return len(encoders) == 1 and self.vectors[""].shape[-1] == encoders[0][1]
        return bool(encoders) and all(kind in self.vectors and self.vectors[kind].shape[-1] == width
                                      for kind, width in encoders) and (not every or len(self.vectors) == len(encoders))

    def to_json(self) -> dict:
        """As A1111's ``/sdapi/v1/embeddings`` describes one."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.count}


def read_embedding(path: Path) -> Embedding:
    """One embedding file (A1111's ``create_embedding_from_data``), or ModelError saying what is wrong with it."""
    import torch

    data = _read(path)
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} is not a textual-inversion embedding (it holds no named tensors)")
    params = data.get("string_to_param")
    params = getattr(params, "_parameters", params)  # an nn.ParameterDict, where torch unpickled one
    if isinstance(params, dict):
        if len(params) != 1:
            raise ModelError(f"{path.name} holds {len(params)} embeddings in string_to_param; one per file is read")
        tensors = {"": next(iter(params.values()))}
    elif "clip_l" in data and "clip_g" in data:
        tensors = {k: data[k] for k in SDXL_ENCODERS}
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            raise ModelError(f"{path.name} is not a textual-inversion embedding: expected string_to_param, one "
                             f"tensor, or clip_l + clip_g; found {', '.join(sorted(map(str, data)))[:200] or 'nothing'}")
        tensors = {"": next(iter(tensors.values()))}  # its key is a name of no meaning (emb_params, "<token>")
    vectors = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or not tensor.is_floating_point():
            raise ModelError(f"{path.name}: {key or 'its tensor'} is not a (vectors, width) float tensor")
        tensor = tensor.detach().to("cpu", torch.float32)
        vectors[key] = tensor[None] if tensor.dim() == 1 else tensor
    counts = {t.shape[0] for t in vectors.values()}
    if len(counts) != 1:
        raise ModelError(f"{path.name}: clip_l and clip_g differ ({[tuple(t.shape) for t in vectors.values()]})")
    count = counts.pop()
    if not 1 <= count <= MAX_VECTORS:
        raise ModelError(f"{path.name} has {count} vectors; an embedding has 1 to {MAX_VECTORS} (one chunk)")

    def text(key):
        value = data.get(key)
        return value if isinstance(value, str | int) and not isinstance(value, bool) else None

    step = data.get("step")
    shape = sum(t.shape[-1] for t in vectors.values())
    return Embedding(path.stem, path, vectors, count, shape, step=step if isinstance(step, int) else None,
                     sd_checkpoint=text("sd_checkpoint"), sd_checkpoint_name=text("sd_checkpoint_name"))


def _read(path: Path):
    if path.suffix.lower() == ".safetensors":
        from .load import load_state_dict

        return load_state_dict(path)
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{path.name} contains code, not only weights, so it was not loaded; if you trust its "
                         f"source, convert it once with: brushwork models convert '{path}'") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise ModelError(f"{path.name} is not a readable embedding ({str(err).strip()[:160]})") from err


@dataclass
class EmbeddingDatabase:
    """The embeddings one model can use (``loaded``: their width is its text encoder's) and those it cannot
    (``skipped``), for one request: ``lookup`` is what ``prompts.tokenize_weighted`` matches, ``used`` what it
    found (the infotext's ``TI hashes``)."""

    loaded: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, Embedding] = field(default_factory=dict)
    used: dict[str, Embedding] = field(default_factory=dict)
    _lookups: dict = field(default_factory=dict)

    def lookup(self, tokenizer) -> dict:
        """{first token id: [(the name's token ids, embedding), ...] longest first} for this tokenizer."""
        key = id(tokenizer)
        if key not in self._lookups:
            table: dict[int, list] = {}
            for embedding in self.loaded.values():
                ids = tuple(tokenizer(embedding.name, add_special_tokens=False)["input_ids"])
                if ids:
                    table.setdefault(ids[0], []).append((ids, embedding))
            for entries in table.values():
                entries.sort(key=lambda entry: len(entry[0]), reverse=True)
            self._lookups[key] = (tokenizer, table)  # the tokenizer is held so that its id stays its own
        return self._lookups[key][1]


class EmbeddingLibrary:
    """The embedding files of a model library, each read once per file version."""

    def __init__(self, store: ModelStore):
        self.store = store
        self._seen: dict[str, tuple[tuple, Embedding | None]] = {}  # path -> (size and time, embedding or None)

    def files(self) -> list[Path]:
        root = self.store.root
        if not root.is_dir():
            return []
        found: dict[str, Path] = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in EMBEDDING_FOLDERS):
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and path.stem not in found:
                    found[path.stem] = path
        return list(found.values())

    def embeddings(self) -> list[Embedding]:
        """Every readable embedding (a file that cannot be read is logged once and left out, as A1111)."""
        out = []
        for path in self.files():
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            seen = self._seen.get(str(path))
            if seen is None or seen[0] != stamp:
                try:
                    embedding = read_embedding(path) if st.st_size else None
                except ModelError as err:
                    log.warning("embedding %s left out: %s", path, err)
                    embedding = None
                seen = self._seen[str(path)] = (stamp, embedding)
            if seen[1] is not None:
                out.append(seen[1])
        return out

    def for_encoders(self, encoders: list[tuple[str, int]], *, every: bool = True) -> EmbeddingDatabase:
        """The database for a model with these text encoders (``text_encoders``; ``every``: ``Embedding.fits``)."""
        db = EmbeddingDatabase()
        for embedding in self.embeddings():
            (db.loaded if embedding.fits(encoders, every=every) else db.skipped)[embedding.name] = embedding
        return db

    def for_model(self, parts, *, every: bool = True) -> EmbeddingDatabase:
        return self.for_encoders(text_encoders(parts), every=every)

    def hash(self, embedding: Embedding) -> str:
        if embedding.sha256 is None:
            embedding.sha256 = self.store.hashes.sha256(embedding.path)
        return embedding.sha256


# the text encoders of each kind of family (families.Family.text_encoder), for a model not loaded yet
FAMILY_ENCODERS = {"clip": [("", 768)], "openclip": [("", 1024)], "sdxl": [("clip_l", 768), ("clip_g", 1280)],
                   "sdxl-refiner": [("clip_g", 1280)]}


def family_encoders(family: str | None) -> list[tuple[str, int]]:
    from .families import FAMILY_BY_NAME

    found = FAMILY_BY_NAME.get(family or "")
    return list(FAMILY_ENCODERS.get(found.text_encoder, [])) if found else []


def encoder_kind(text_encoder) -> str:
    """Which vectors of an embedding a text encoder takes: SDXL's OpenCLIP bigG (the one with a projection)
    "clip_g", any other "clip_l" (a one-encoder embedding's vectors serve either)."""
    return "clip_g" if type(text_encoder).__name__ == "CLIPTextModelWithProjection" else "clip_l"


def text_encoders(parts) -> list[tuple[str, int]]:
    """(kind, token embedding width) of each of a model's text encoders: SD 1.x [("", 768)], SD 2.x [("", 1024)],
    SDXL [("clip_l", 768), ("clip_g", 1280)], its refiner [("clip_g", 1280)]."""
    found = [te for te in (getattr(parts, "text_encoder", None), getattr(parts, "text_encoder_2", None)) if te]
    xl = getattr(parts, "text_encoder_2", None) is not None
    return [(encoder_kind(te) if xl else "", te.get_input_embeddings().embedding_dim) for te in found]
