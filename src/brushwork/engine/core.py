"""The Engine: settings in, images out. Every front end (CLI, HTTP, web UI) goes through it.

    engine = Engine()                      # Settings.load() by default
    result = engine.generate(GenerationRequest(prompt="a red circle", steps=20, seed=1))
    result.images[0].save("out.png")

One model is kept loaded at a time; a request naming another model swaps it. ``generate`` is
thread-safe (one run at a time per engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..models.store import ModelEntry, ModelStore
from ..request import GenerationRequest, GenerationResult, ModelError, ProgressInfo
from ..settings import Settings
from .tasks.base import RunControl, text_to_image_models

log = logging.getLogger(__name__)

__version__ = "0.1.0"


@dataclass
class LoadedModel:
    entry: ModelEntry
    parts: object  # models.load.ModelParts, on the device
    policy: object  # engine.device.DevicePolicy
    vae_name: str | None
    key: tuple
    memory_state: dict = field(default_factory=dict)  # the memory mode an out-of-memory error stepped down to


class Engine:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.load()
        self.store = ModelStore(self.settings)
        self._loaded: LoadedModel | None = None
        # one more model kept loaded beside it, when a request asks for one: SDXL's refiner or the hires fix's
        # checkpoint (loading the one replaces the other)
        self._second: LoadedModel | None = None
        self._lock = threading.RLock()
        from ..models.embeddings import EmbeddingLibrary
        from ..models.loras import LoraLibrary

        self.loras = LoraLibrary(self.store)  # the library's lora/ folder (A1111's models/Lora), read once per file
        self.embeddings = EmbeddingLibrary(self.store)  # its embeddings/ folder (textual inversion)
        from ..models.controlnets import ControlNetLibrary

        self.controlnets = ControlNetLibrary(self.store)  # its controlnet/ folder (A1111's models/ControlNet)

    # ---- models -------------------------------------------------------------------------------

    def list_models(self) -> list[ModelEntry]:
        return [self.store.with_family(self.store.with_hash(e)) for e in self.store.scan()]

    def refresh_models(self) -> list[ModelEntry]:
        return self.list_models()

    def embedding_database(self):
        """The library's textual-inversion embeddings as the loaded model takes them (``loaded``: they fit its text
        encoders; ``skipped``: they do not), or before any model is loaded, as the default model's family would."""
        from ..models.embeddings import family_encoders

        loaded = self._loaded
        if loaded is not None:
            return self.embeddings.for_model(loaded.parts)
        try:
            family = self.store.with_family(self.resolve(None)[0]).family
        except ModelError:
            family = None
        return self.embeddings.for_encoders(family_encoders(family))

    @property
    def current_model(self) -> ModelEntry | None:
        return self._loaded.entry if self._loaded else None

    def unload(self) -> None:
        with self._lock:
            self._loaded = self._second = None
            self.controlnets.unload()
            _free_device_memory()

    def resolve(self, name: str | None) -> tuple[ModelEntry, str | None]:
        return self.store.resolve(name, default=self.settings.default_model)

    def load(self, request: GenerationRequest) -> tuple[LoadedModel, list[str]]:
        """Load (or reuse) the model a request names, placed per the device policy."""
        from . import backends
        from . import device as device_mod

        device = request.device if request.device != "auto" else self.settings.device
        precision = request.precision.value if request.precision.value != "auto" else self.settings.precision
        device_mod.choose(device, precision, backend=self.settings.backend)  # fails here before any loading
        entry, hint = self.resolve(request.model)
        notes = [hint] if hint else []
        key = (str(entry.path), request.vae, request.prediction, device, precision, request.turbo is True)
        with self._lock:
            if self._loaded is not None and self._loaded.key == key:
                return self._loaded, notes
            self._loaded = None
            self.controlnets.unload()  # they were made for the model that goes
            _free_device_memory()
            import torch

            if self.settings.threads > 0:
                torch.set_num_threads(self.settings.threads)
            elif (threads := device_mod.cpu_threads(torch.get_num_threads())) < torch.get_num_threads():
                torch.set_num_threads(threads)  # a container's CPU quota or this process's affinity
            parts = self._load_parts(entry, request)
            # the dtype can depend on the model's size (bf16 pays on a CPU only for large models)
            policy = device_mod.choose(device, precision, unet_params=device_mod.unet_param_count(parts),
                                       compile=self.settings.compile, backend=self.settings.backend)
            # on a GPU the memory plan moves the weights there (or offloads them), so any model loads
            device_mod.place(parts, policy, to_device=policy.is_cpu)
            parts.backend = backends.for_model(policy, self.settings)  # OpenVINO: converted at first use
            if policy.backend_note:
                notes.append(policy.backend_note)
            if parts.tiny_vae is not None:  # ~1M parameters: on the device in every memory mode
                parts.tiny_vae.to(policy.device, policy.vae_dtype)
            self._loaded = LoadedModel(entry, parts, policy, request.vae, key)
            return self._loaded, notes + list(parts.notes)

    def load_refiner(self, request: GenerationRequest) -> LoadedModel:
        """The refiner a request names (kept loaded beside the model, as A1111 keeps both), placed as the model."""
        entry, _ = self.store.resolve(request.refiner, default=None)
        refiner = self._load_second(entry, request, vae=None)
        if not refiner.parts.family.xl:
            raise ModelError(f"{refiner.parts.name} is not an SDXL model ({refiner.parts.family.label}); a refiner "
                             "must be SDXL (e.g. sd_xl_refiner_1.0) or an SDXL checkpoint")
        return refiner

    def load_hires_checkpoint(self, request: GenerationRequest) -> LoadedModel:
        """The hires fix's checkpoint a request names (kept loaded beside the model), placed as the model; with the
        request's VAE, as A1111 puts the chosen VAE on whatever checkpoint it loads. Its latents must be the
        model's: the first pass's latents go on to it."""
        entry, _ = self.store.resolve(request.hires_checkpoint, default=None)
        if entry.path == self._loaded.entry.path:  # the model itself (A1111 then switches nothing)
            return self._loaded
        second = self._load_second(entry, request, vae=request.vae)
        base, other = self._loaded.parts, second.parts
        if (base.family.xl, base.vae.config.latent_channels) != (other.family.xl, other.vae.config.latent_channels):
            raise ModelError(f"the hires checkpoint {other.name} ({other.family.label}) does not share the latent space "
                             f"of {base.name} ({base.family.label}); choose a checkpoint of the same kind")
        if (problem := text_to_image_models(other)) is not None or other.family.name == "sdxl-refiner":
            raise ModelError(f"the hires checkpoint must be a text-to-image model: "
                             f"{problem or f'{other.name} is an SDXL refiner'}")
        return second

    def _titled(self, loaded: LoadedModel) -> tuple:
        """(its parts, A1111's "name [hash]" of it: the infotext's ``Refiner`` / ``Hires checkpoint``, the name
        without its suffix)."""
        entry = self.store.with_hash(loaded.entry) if loaded.entry.path.is_file() else loaded.entry
        short = entry.short_hash
        return loaded.parts, f"{loaded.parts.name} [{short}]" if short else loaded.parts.name

    def _load_second(self, entry: ModelEntry, request: GenerationRequest, *, vae: str | None) -> LoadedModel:
        """The one model kept loaded beside the model (the refiner or the hires checkpoint), placed as the model."""
        from . import backends
        from . import device as device_mod

        base = self._loaded
        key = (str(entry.path), vae, base.policy.device, str(base.policy.dtype))
        with self._lock:
            if self._second is not None and self._second.key == key:
                return self._second
            self._second = None
            _free_device_memory()
            import dataclasses

            parts = self._load_parts(entry, dataclasses.replace(request, vae=vae, prediction=None, config=None,
                                                                turbo=None))
            device_mod.place(parts, base.policy, to_device=base.policy.is_cpu)
            parts.backend = backends.for_model(base.policy, self.settings)
            if parts.tiny_vae is not None:
                parts.tiny_vae.to(base.policy.device, base.policy.vae_dtype)
            self._second = LoadedModel(entry, parts, base.policy, vae, key)
            return self._second

    def _load_parts(self, entry: ModelEntry, request: GenerationRequest):
        from ..models import load as load_mod
        from ..models.store import download_hub_model

        if entry.format == "hub":
            parts = load_mod.load_diffusers_folder(download_hub_model(entry.name), prediction=request.prediction)
        elif entry.format == "diffusers":
            parts = load_mod.load_diffusers_folder(entry.path, prediction=request.prediction)
        else:
            if not entry.path.is_file():
                raise ModelError(f"model file not found: {entry.path}")
            config = request.config
            parts = load_mod.load_single_file(
                entry.path,
                prediction=request.prediction,
                config_yaml=Path(config) if config else None,
                short_hash=lambda: self.store.with_hash(entry).short_hash,
                turbo=request.turbo is True,  # --turbo: an SD 2.x file is then SD-Turbo's eps
            )
        if entry.bundled:
            parts.name = entry.name
        from ..models import taesd

        if (tiny := taesd.requested(request.vae, self.store)) is not None:
            parts.tiny_vae = taesd.for_model(tiny, parts)  # the final decode only; its scaling factor stays 1.0
        elif request.vae:
            vae_path = Path(request.vae).expanduser()
            if not vae_path.exists():
                raise ModelError(f"VAE not found: {vae_path}")
            vae = load_mod.load_vae(vae_path)
            vae.register_to_config(scaling_factor=parts.vae.config.scaling_factor)
            parts.vae = vae
        return parts

    # ---- generating ---------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: Callable[[ProgressInfo], None] | None = None,
        cancel: threading.Event | None = None,
        interrupt: threading.Event | None = None,
        skip: threading.Event | None = None,
        want_previews: bool = False,
        control: RunControl | None = None,
    ) -> GenerationResult:
        """Make the pictures a request asks for. Follow and steer the run with ``progress`` (a callback),
        ``cancel`` / ``interrupt`` / ``skip`` (threading events) and ``want_previews``, or one ``control``."""
        from . import controlnet, memory, networks, run

        if control is None:
            control = RunControl(progress=progress, cancel=cancel, interrupt=interrupt, skip=skip,
                                 want_previews=want_previews)
        request.validate()
        if request.watermark and not self.settings.watermark:  # the setting turns it off for every front end
            import dataclasses

            request = dataclasses.replace(request, watermark=False)
        memory.check_mode(request.memory if request.memory != "auto" else self.settings.memory)
        started = time.perf_counter()
        with self._lock:
            loaded, notes = self.load(request)
            load_s = time.perf_counter() - started
            entry = self.store.with_hash(loaded.entry) if loaded.entry.path.is_file() else loaded.entry
            request, default_notes = run.model_defaults(request, loaded.parts, self.loras)
            notes = notes + default_notes
            refiner = None
            if request.refiner is not None and request.refiner_switch_at < 1:
                if not loaded.parts.family.xl:
                    raise ModelError(f"a refiner takes over from an SDXL model; {loaded.parts.name} is "
                                     f"{loaded.parts.family.label}: leave the refiner out")
                refiner = self._titled(self.load_refiner(request))
            hires_model = None
            if request.hires_enabled and request.hires_checkpoint is not None:
                hires_model = self._titled(self.load_hires_checkpoint(request))
            # the prompt's LoRAs go on the loaded model for this run only, and its embeddings are looked up
            nets = networks.Networks(loaded.parts, request, self.loras, self.embeddings)
            # the ControlNet units' models, loaded for this model (kept for the next request that names them)
            controls = controlnet.Controls(loaded.parts, loaded.policy, request, self.controlnets)
            if controls:
                controls.prepare()
            try:
                nets.prepare()
                if hires_model is not None:  # its pass runs with the LoRAs too: a file that does not fit it says so now
                    try:
                        nets.for_model(hires_model[0]).prepare()
                    except ModelError as err:
                        raise ModelError(f"the hires checkpoint {hires_model[0].name}: {err}") from err
                result = run.generate(
                    loaded.parts,
                    loaded.policy,
                    request,
                    model_name=loaded.parts.name,
                    model_hash=entry.short_hash,
                    memory_mode=request.memory if request.memory != "auto" else self.settings.memory,
                    memory_state=loaded.memory_state,
                    control=control,
                    version=__version__,
                    settings=self.settings,
                    refiner=refiner,
                    hires_model=hires_model,
                    networks=nets,
                    controlnet=controls if controls else None,
                )
            finally:
                nets.release()  # the model exactly as loaded for the next request
        result.notes[:0] = notes
        result.timings["load_s"] = round(load_s, 3)
        result.timings["total_s"] = round(time.perf_counter() - started, 3)
        return result


def _free_device_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
