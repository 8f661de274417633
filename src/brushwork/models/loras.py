"""The library's LoRAs (A1111's ``models/Lora``): files in its ``lora/`` folder, found by file name or alias, with
A1111's hash. Torch-free: only safetensors headers are read here; ``engine/lora.py`` applies them.

As A1111's Lora extension (``network.NetworkOnDisk``, ``networks.list_available_networks``):

- the name is the file name without its extension, anywhere under the folder; the alias is the file's
  ``ss_output_name`` metadata (kohya's trainer writes it), else the name. ``<lora:x:...>`` finds ``x`` as a name,
  then as an alias (an alias that two files share finds neither: A1111's "forbidden" aliases);
- the hash ("Lora hashes" in the infotext): the ``sshs_model_hash`` metadata, else the sha256 of a
  ``.safetensors`` file's bytes after its header (kohya's and sd-webui-additional-networks' "addnet" hash; the
  header, which tools rewrite, is left out), else of the whole file; 12 hex digits in the infotext. The metadata
  value is untrusted text, so only a hex string is taken from it.
- reading an infotext, ``<lora:name:`` is replaced by the alias of the file whose hash the ``Lora hashes`` key
  gives for that name (A1111's ``infotext_pasted``): a picture shared with a renamed file still finds it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .store import LORA_FOLDERS, ModelStore

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
SHORT_HASH = 12  # hex digits of the hash in the infotext
_HEX = re.compile(r"[0-9a-fA-F]{12,64}")


@dataclass
class LoraFile:
    name: str  # the file name without its extension
    path: Path
    alias: str  # ss_output_name, else the name
    metadata: dict = field(default_factory=dict)  # the safetensors metadata, JSON values parsed (as A1111)
    sha256: str | None = None  # A1111's hash (hex), once computed (``LoraLibrary.hash``)

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:SHORT_HASH] if self.sha256 else None

    def to_json(self) -> dict:
        """As A1111's ``/sdapi/v1/loras`` lists it."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


def addnet_hash(path: Path) -> str:
    """sha256 of a .safetensors file's bytes after its header (8 bytes of length, then that many of JSON)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(n + 8)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: Path) -> dict:
    """A .safetensors file's metadata, values that hold JSON objects parsed (A1111's
    ``read_metadata_from_safetensors``); cover images left out. {} for other files or a broken header."""
    if path.suffix.lower() != ".safetensors":
        return {}
    from ..errors import ModelError
    from .load import read_safetensors_header

    try:
        raw = read_safetensors_header(path)[1]
    except ModelError:
        return {}
    out = {}
    for key, value in raw.items():
        if key == "ssmd_cover_images":  # pictures as base64: too big to list
            continue
        out[key] = value
        if isinstance(value, str) and value.startswith("{"):
            try:
                out[key] = json.loads(value)
            except ValueError:
                pass
    return out


class LoraLibrary:
    """The LoRA files of a model library, read once per file version."""

    def __init__(self, store: ModelStore):
        self.store = store
        self._seen: dict[str, tuple[tuple, LoraFile]] = {}  # path -> (size and time, its entry)

    def folders(self) -> list[Path]:
        root = self.store.root
        if not root.is_dir():
            return []
        return sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in LORA_FOLDERS)

    def files(self) -> list[LoraFile]:
        """Every LoRA of the library, sorted by name (a name two files share: the first in path order)."""
        found: dict[str, LoraFile] = {}
        for folder in self.folders():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in LORA_SUFFIXES and path.is_file() and path.stem not in found:
                    found[path.stem] = self._entry(path)
        return sorted(found.values(), key=lambda f: f.name.lower())

    def _entry(self, path: Path) -> LoraFile:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        seen = self._seen.get(str(path))
        if seen is not None and seen[0] == stamp:
            return seen[1]
        metadata = read_metadata(path)
        alias = metadata.get("ss_output_name")
        entry = LoraFile(path.stem, path, alias if isinstance(alias, str) and alias.strip() else path.stem, metadata)
        self._seen[str(path)] = (stamp, entry)
        return entry

    def lcm_lora(self, lora: LoraFile) -> str | None:
        """Why ``lora`` is an LCM-LoRA (``models.fewstep.lcm_lora_why``: its name, a folder it is in under the
        library's lora/ folder, or its metadata), or None."""
        from .fewstep import lcm_lora_why

        folders: tuple[str, ...] = ()
        for folder in self.folders():
            try:
                folders = lora.path.parent.relative_to(folder).parts
                break
            except ValueError:
                continue
        return lcm_lora_why(lora.name, folders, lora.metadata)

    def find(self, name: str, files: list[LoraFile] | None = None) -> LoraFile | None:
        """The LoRA a tag names: by file name, then by alias (an alias two files share finds neither), exactly,
        then ignoring case."""
        files = self.files() if files is None else files
        wanted = name.strip()
        for same in (lambda a, b: a == b, lambda a, b: a.lower() == b.lower()):
            for f in files:
                if same(f.name, wanted):
                    return f
            by_alias = [f for f in files if same(f.alias, wanted)]
            if len(by_alias) == 1:
                return by_alias[0]
        return None

    def hash(self, lora: LoraFile) -> str:
        """A1111's hash of the file (hex): ``sshs_model_hash``, else the addnet hash (safetensors), else the
        sha256 of the file; remembered with the library's other hashes."""
        if lora.sha256 is None:
            given = lora.metadata.get("sshs_model_hash")
            if isinstance(given, str) and _HEX.fullmatch(given.strip()):
                lora.sha256 = given.strip().lower()
            elif lora.path.suffix.lower() == ".safetensors":
                lora.sha256 = self.store.hashes.remembered(lora.path, "addnet", lambda: addnet_hash(lora.path))
            else:
                lora.sha256 = self.store.hashes.sha256(lora.path)
        return lora.sha256

    def by_hash(self, shorthash: str, files: list[LoraFile] | None = None) -> LoraFile | None:
        """The LoRA whose hash starts with ``shorthash`` (A1111 writes 12 hex digits; 8 in older versions)."""
        digits = shorthash.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", digits):
            return None
        for f in self.files() if files is None else files:
            if self.hash(f).startswith(digits):
                return f
        return None

    def names(self) -> str:
        """The library's LoRA names, for an error message."""
        files = self.files()
        if not files:
            folder = self.store.root / "lora"
            return f"none: put LoRA files in {folder}"
        return ", ".join(f.name for f in files[:40]) + (", ..." if len(files) > 40 else "")


def parse_hashes(value: str) -> dict[str, str]:
    """An infotext's ``Lora hashes`` / ``TI hashes`` value, ``"a: 0123456789ab, b: ..."`` -> {name: hash}."""
    out = {}
    for item in value.split(","):
        name, sep, digits = item.partition(":")
        if sep and name.strip() and digits.strip():
            out[name.strip()] = digits.strip()
    return out


def with_names_from_hashes(prompt: str, hashes: str, library: LoraLibrary) -> str:
    """``prompt`` with each ``<lora:name:`` whose name ``hashes`` (an infotext's ``Lora hashes``) gives a hash for
    naming the library's file of that hash (by its alias, as A1111); tags without a known hash stay as they are."""
    from ..engine.prompts import extra_network_spans

    known = parse_hashes(hashes)
    if not known:
        return prompt
    files = library.files()
    out, pos = [], 0
    for start, end, kind, args in extra_network_spans(prompt):
        if kind.lower() not in ("lora", "lyco") or not args:
            continue
        digits = known.get(args[0].replace(":", "").replace(",", ""))
        found = library.by_hash(digits, files) if digits else None
        if found is not None and library.find(args[0], files) is not found:
            alias = found.alias if library.find(found.alias, files) is found else found.name
            out.append(prompt[pos:start])
            out.append(f"<{kind}:{':'.join([alias, *args[1:]])}>")
            pos = end
    out.append(prompt[pos:])
    return "".join(out)
