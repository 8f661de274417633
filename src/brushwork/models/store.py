"""The user's model library: find models by name, path, hash or hub id; hash them once.

Models live in ``Settings.models_dir`` (``~/.brushwork/models``): single files
(``.safetensors``, ``.ckpt``) and diffusers folders. The bundled mini model is always there as
the last resort. Hashes follow A1111: "Model hash" = the first 10 hex digits of the file's
sha256, cached by path, size and modification time so a 4 GB file is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ModelError
from ..settings import Settings

MODEL_SUFFIXES = (".safetensors", ".ckpt")
BUNDLED_NAME = "mini"
# upscaler models (ESRGAN family: engine/upscalers.py) live in these top folders of the library (A1111 and
# ComfyUI spell them so; any case); they are never checkpoints
UPSCALER_FOLDERS = ("upscalers", "upscale_models", "esrgan", "realesrgan", "swinir", "dat")
UPSCALER_SUFFIXES = (".pth", ".safetensors")
# TAESD's tiny decoders (models/taesd.py) live in these top folders (A1111's VAE-approx/ and VAE-taesd/, ComfyUI's
# vae_approx/; any case); never checkpoints, never full VAEs
VAE_APPROX_FOLDERS = ("vae-approx", "vae_approx", "vae-taesd")
# LoRAs (models/loras.py: A1111's Lora/ and LyCORIS/, ComfyUI's loras/) and textual-inversion embeddings
# (models/embeddings.py: A1111's and ComfyUI's embeddings/) live in these top folders (any case); never checkpoints
LORA_FOLDERS = ("lora", "loras", "lycoris")
EMBEDDING_FOLDERS = ("embeddings",)
# ControlNets (models/controlnets.py: A1111's ControlNet/, ComfyUI's controlnet/) and the preprocessors' annotator
# weights live in these top folders (any case); never checkpoints
CONTROLNET_FOLDERS = ("controlnet", "annotators")


def bundled_model_path() -> Path:
    return Path(str(resources.files("brushwork.models").joinpath("mini/mini.safetensors")))


@dataclass
class ModelEntry:
    name: str
    path: Path
    format: str  # "safetensors" | "ckpt" | "diffusers" | "hub"
    bundled: bool = False
    sha256: str | None = None
    family: str | None = None  # read from the file's header (``ModelStore.with_family``); None until then

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        """A1111's checkpoint title: ``file name [short hash]``."""
        label = self.path.name if self.format != "hub" else self.name
        return f"{label} [{self.short_hash}]" if self.short_hash else label


class HashCache:
    """sha256 of files, remembered in ``<home>/cache/hashes.json``."""

    def __init__(self, path: Path):
        self.path = path
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def sha256(self, file: Path) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.hexdigest()

        return self.remembered(file, "sha256", digest)

    def _entry(self, file: Path) -> tuple[str, list, dict | None]:
        """(key, stamp, what is remembered for this file while its size and time are unchanged, or None)."""
        st = file.stat()
        key, stamp = str(file.resolve()), [st.st_size, st.st_mtime_ns]
        entry = self._load().get(key)
        return key, stamp, entry if entry and entry.get("stamp") == stamp else None

    def remembered(self, file: Path, what: str, compute):
        """``compute()`` for this file, remembered under ``what`` until the file's size or time changes."""
        key, stamp, entry = self._entry(file)
        if entry is None:
            entry = self._load()[key] = {"stamp": stamp}
        if what in entry:
            return entry[what]
        value = entry[what] = compute()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._load()))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
        return value

    def known(self, file: Path, what: str):
        """What ``remembered`` holds for this file under ``what``; None if nothing, or the file has changed."""
        entry = self._entry(file)[2]
        return entry.get(what) if entry else None


def legacy_hash(file: Path) -> str:
    """A1111's old 8-hex hash: sha256 of 64 KiB at offset 1 MiB."""
    with open(file, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class ModelStore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.hashes = HashCache(settings.cache_dir / "hashes.json")

    @property
    def root(self) -> Path:
        return self.settings.models_dir

    def scan(self) -> list[ModelEntry]:
        """Every model in the library (sorted by name), then the bundled one. VAEs are apart (``vaes``)."""
        found: list[ModelEntry] = []
        if self.root.is_dir():
            folders: list[Path] = []  # diffusers folders: their unet/, vae/, ... files are parts, not models
            for path in sorted(self.root.rglob("*")):
                relative = path.relative_to(self.root)
                if _in_vae_folder(relative) or _in_upscaler_folder(relative) or _in_vae_approx_folder(relative) or \
                        _in_network_folder(relative) or _in_controlnet_folder(relative) or \
                        any(f in path.parents for f in folders):
                    continue
                if path.is_file() and path.suffix in MODEL_SUFFIXES and not _is_vae_file(path):
                    found.append(ModelEntry(path.stem, path, path.suffix[1:]))
                elif path.is_dir() and (path / "model_index.json").is_file():
                    found.append(ModelEntry(path.name, path, "diffusers"))
                    folders.append(path)
        bundled = bundled_model_path()
        if bundled.is_file():
            found.append(ModelEntry(BUNDLED_NAME, bundled, "safetensors", bundled=True))
        return found

    def vaes(self) -> list[ModelEntry]:
        """The VAEs of the library: files in its ``vae/`` (or A1111's ``VAE/``) folder and ``*.vae.safetensors``
        (``.ckpt``, ``.pt``) anywhere in it, sorted by name."""
        found: list[ModelEntry] = []
        if self.root.is_dir():
            for path in sorted(self.root.rglob("*")):
                if path.is_file() and path.suffix in (*MODEL_SUFFIXES, ".pt") and (
                        _in_vae_folder(path.relative_to(self.root)) or _is_vae_file(path)):
                    found.append(ModelEntry(path.name, path, path.suffix[1:]))
        return found

    def upscalers(self) -> list[ModelEntry]:
        """The upscaler models of the library: ``.pth`` / ``.safetensors`` files in its ``UPSCALER_FOLDERS``
        (``upscalers/``, A1111's ``ESRGAN/``, ``RealESRGAN/``, ``SwinIR/``, ``DAT/``, ComfyUI's ``upscale_models/``),
        by file stem, sorted; where two files share a stem the ``.safetensors`` one is kept."""
        found: dict[str, ModelEntry] = {}
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and _in_upscaler_folder(Path(p.name))):
                for path in sorted(folder.rglob("*")):
                    if not path.is_file() or path.suffix.lower() not in UPSCALER_SUFFIXES:
                        continue
                    kept = found.get(path.stem)
                    if kept is None or (kept.format != "safetensors" and path.suffix.lower() == ".safetensors"):
                        found[path.stem] = ModelEntry(path.stem, path, path.suffix[1:].lower())
        return sorted(found.values(), key=lambda e: e.name.lower())

    def vae_approx(self) -> list[Path]:
        """What the library's ``VAE_APPROX_FOLDERS`` hold (``vae-approx/``, A1111's ``VAE-approx/`` and ``VAE-taesd/``,
        ComfyUI's ``vae_approx/``): their files and folders, sorted; ``models/taesd.py`` picks TAESD's among them."""
        if not self.root.is_dir():
            return []
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and _in_vae_approx_folder(Path(p.name)))
        return [path for folder in folders for path in sorted(folder.iterdir())]

    def with_hash(self, entry: ModelEntry) -> ModelEntry:
        if entry.sha256 is None and entry.path.is_file():
            entry.sha256 = self.hashes.sha256(entry.path)
        return entry

    def with_family(self, entry: ModelEntry) -> ModelEntry:
        """``entry.family`` from the file's header (safetensors: the key names, no weights read; a diffusers
        folder: its configs; a pickle is opened only as a zip index), cached with the hash."""
        if entry.family is None and entry.format != "hub":
            entry.family = self.hashes.remembered(entry.path, "family", lambda: family_of_path(entry.path))
        return entry

    def resolve(self, name: str | None, *, default: str | None = None) -> tuple[ModelEntry, str | None]:
        """(entry, a hint for the user or None). Order: name, configured default, library, bundled."""
        if name:
            return self.find(name), None
        if default:
            return self.find(default), None
        entries = self.scan()
        library = [e for e in entries if not e.bundled]
        if library:
            return library[0], None
        if entries:
            return entries[-1], (
                "using the bundled mini model (64x64 pictures of flat shapes); for real pictures put a "
                f"Stable Diffusion checkpoint in {self.root} or pass --model FILE"
            )
        raise ModelError(f"no model found; put a Stable Diffusion checkpoint in {self.root} or pass --model FILE")

    def find(self, name: str, *, paths: bool = True) -> ModelEntry:
        """The one model resolver, for the CLI and HTTP alike. ``name`` is a library model's name, its A1111 title
        ("file name [hash]"), its file name, its hash (10 hex = A1111's "Model hash", 8 = the old one, or a longer
        sha256 prefix), matched exactly, then ignoring case. With ``paths`` (the CLI, the Python API) it may also
        be a file or diffusers folder, or a hub id; without (HTTP) only the library is searched."""
        wanted = name.strip()
        if paths:
            path = Path(wanted).expanduser()
            if path.is_file():
                if path.suffix not in MODEL_SUFFIXES + (".pt", ".pth", ".bin"):
                    raise ModelError(f"{path.name} is not a model file (expected .safetensors or .ckpt)")
                return ModelEntry(path.stem, path, path.suffix[1:])
            if path.is_dir():
                if (path / "model_index.json").is_file():
                    return ModelEntry(path.name, path, "diffusers")
                raise ModelError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        entries = self.scan()
        bare = re.sub(r"\s*\[[0-9a-fA-F]{8,10}\]$", "", wanted)  # A1111 titles: "name [hash]"
        for same in (lambda a, b: a == b, lambda a, b: a.lower() == b.lower()):
            for entry in entries:
                names = (entry.name, entry.path.name, entry.path.stem)
                if any(same(bare, n) for n in names) or str(entry.path).endswith("/" + bare):
                    return entry
        if re.fullmatch(r"[0-9a-fA-F]{8,64}", wanted):
            digits = wanted.lower()
            for entry in (e for e in entries if e.path.is_file()):
                if len(digits) == 8 and legacy_hash(entry.path) == digits:
                    return entry
                if len(digits) >= 10 and (self.with_hash(entry).sha256 or "").startswith(digits):
                    return entry
        if paths and re.fullmatch(r"[\w.\-]+/[\w.\-]+", wanted) and not wanted.endswith(MODEL_SUFFIXES):
            return ModelEntry(wanted, Path(wanted), "hub")
        known = ", ".join(e.name for e in entries) or "none"
        where = "not a file, and not" if paths else "not"
        raise ModelError(f"model {wanted!r} not found: {where} in the library {self.root} (has: {known})")


def family_of_path(path: Path) -> str | None:
    """The family name of a model file or diffusers folder, from its header alone; None if it cannot be told."""
    from .detect import family_name

    try:
        if path.is_dir():
            return _family_of_folder(path)
        if path.suffix == ".safetensors":
            from .load import read_safetensors_header

            return family_name(read_safetensors_header(path)[0])
        return family_name(_pickle_keys(path))
    except (ModelError, OSError, ValueError):
        return None


def _family_of_folder(path: Path) -> str | None:
    from .detect import family_name

    unet = json.loads((path / "unet" / "config.json").read_text())
    te_file = path / "text_encoder" / "config.json"
    te = json.loads(te_file.read_text()) if te_file.is_file() else {}
    kind = "openclip" if te.get("hidden_act") == "gelu" else "clip"
    xl = (path / "text_encoder_2").is_dir() or unet.get("addition_embed_type") == "text_time"
    if xl and not te:
        return "sdxl-refiner"  # bigG alone
    return family_name({}, text_encoder=kind, in_channels=int(unet.get("in_channels", 4)), xl=xl)


def _pickle_keys(path: Path) -> dict:
    """The key names of a zip-format .ckpt without reading a tensor (its pickle holds only references); other
    pickles give no keys (their family shows once loaded)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return {}
    import torch

    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")} if isinstance(sd, dict) else {}


def _in_vae_folder(relative: Path) -> bool:
    return bool(relative.parts) and relative.parts[0].lower() == "vae"


def _in_upscaler_folder(relative: Path) -> bool:
    return bool(relative.parts) and relative.parts[0].lower() in UPSCALER_FOLDERS


def _in_vae_approx_folder(relative: Path) -> bool:
    return bool(relative.parts) and relative.parts[0].lower() in VAE_APPROX_FOLDERS


def _in_network_folder(relative: Path) -> bool:
    return bool(relative.parts) and relative.parts[0].lower() in LORA_FOLDERS + EMBEDDING_FOLDERS


def _in_controlnet_folder(relative: Path) -> bool:
    return bool(relative.parts) and relative.parts[0].lower() in CONTROLNET_FOLDERS


def _is_vae_file(path: Path) -> bool:
    return path.name.endswith((".vae.safetensors", ".vae.ckpt", ".vae.pt"))


def download_hub_model(repo_id: str) -> Path:
    """A diffusers model from the Hugging Face hub (cached). Offline: only what is already cached."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["model_index.json", "*.json", "*.txt", "unet/*.safetensors", "vae/*.safetensors",
                "text_encoder/*.safetensors", "tokenizer/*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline, etag_timeout=10))
    except Exception as err:
        why = "offline (HF_HUB_OFFLINE=1) and not in the cache" if offline else f"download failed: {err}"
        raise ModelError(f"cannot get {repo_id} from the hub: {str(why).splitlines()[0][:160]}; "
                         "download the checkpoint yourself and pass --model FILE") from err
