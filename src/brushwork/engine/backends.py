"""CPU backends: where the UNet, the VAE decoder and the text encoders run on a CPU, chosen once per model by the
device policy.

``torch``: PyTorch eager (oneDNN), always there. ``openvino`` (``pip install 'brushwork[openvino]'``, what FastSD
CPU uses): the module converted to OpenVINO's IR with ``ov.convert_model`` from the very diffusers module that is
loaded (its weights, LoRA-free), compiled for this CPU in fp32 (``INFERENCE_PRECISION_HINT f32``: no silent bf16
or fp16), ~1.2x torch eager per UNet step on AVX2 at 6e-6 relative difference (``benchmarks/step.py``).

Converted models are cached on disk, so only the first run pays (minutes for a full-size UNet):
``<home>/cache/openvino/<component>-<fingerprint>/`` holds the IR (weights in fp32), keyed by a SHA-256 of the
component's weights and config, the inputs it takes, and OpenVINO's version; the kernels compiled for each input
shape go to OpenVINO's own cache (``CACHE_DIR``) beside it. A conversion that fails (an unusual module, a broken
OpenVINO) is said in one note and the component stays on torch; nothing is retried until the model loads again.

What stays on torch, per run (one note says so): a UNet with a LoRA / LyCORIS on it (the IR has the plain weights),
fast mode (DeepCache) and token merging (they patch the UNet's insides), and any UNet call with inputs the IR does
not take (ControlNet residuals, the x4 upscaler's noise level): those calls run the torch module, same numbers.
TAESD's tiny decoder (``--vae taesd``) runs on OpenVINO too when it is the final decode (about a fifth of an
SD-Turbo picture's time here); its previews stay on torch. The text encoders run on OpenVINO from their token
embeddings (the lookup, and with it a textual-inversion embedding's vectors, stays on torch): SD 2's OpenCLIP-H pass
takes 0.37-0.41 s against torch's 0.48-0.65 s here, SDXL has two; a LoRA on them keeps them on torch for that
request. The encoder half of the VAE (img2img, inpaint) runs once per picture and stays on torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

log = logging.getLogger("brushwork.backends")

BACKENDS = ("auto", "torch", "openvino")
# the IR layout this code writes; a change here makes every cached conversion a miss, never a wrong hit
FORMAT = 1
# the UNet inputs an IR can take (beside sample, timestep, encoder_hidden_states), by model kind
_XL_INPUTS = ("text_embeds", "time_ids")
_LCM_INPUTS = ("timestep_cond",)


def check_backend(name: str | None) -> str:
    """A backend name from outside (setting, CLI), checked once."""
    from ..errors import InvalidRequest

    name = (getattr(name, "value", name) or "auto").lower()
    if name not in BACKENDS:
        raise InvalidRequest(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be used here (one line), or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install 'brushwork[openvino]')"
    except Exception as error:  # a broken install that fails as it loads its libraries
        return f"OpenVINO does not load ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    return None


# ---- the converted components of one model -------------------------------------------------------------------


class OpenVinoModel:
    """The UNet, VAE decoder and text encoders of one loaded model on OpenVINO: converted once (cached on disk by
    fingerprint), compiled for the input shape of the run (the last shape is kept; a new one compiles again, from
    OpenVINO's kernel cache when it has been seen)."""

    def __init__(self, cache_dir: Path, threads: int = 0):
        self.cache_dir = Path(cache_dir)
        self.threads = threads
        self.notes: list[str] = []  # said once, in the next result
        self.failed: dict[str, str] = {}  # component -> why it stays on torch
        self.stats = {"converted": 0, "loaded_from_cache": 0, "compiled": 0, "convert_s": 0.0}
        self._compiled: dict[str, tuple] = {}  # component -> (input shapes, compiled model)
        self._ir: dict[str, object] = {}  # component -> ov.Model (read or converted)
        self._folders: dict[str, Path] = {}  # component -> its cache folder
        self._spilled: set[str] = set()  # components whose torch weights are mapped from the cache (``_spill``)
        self._lock = threading.Lock()
        self._core = None

    # -- public: what a run wraps itself in --------------------------------------------------------------------

    @contextmanager
    def unet(self, unet):
        """Within the block, calls of ``unet`` the IR can take run on OpenVINO; others on torch."""
        if "unet" in self.failed:
            yield
            return
        inputs = unet_inputs(unet)
        original = unet.forward

        def forward(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
            feeds = None if "unet" in self.failed else \
                self._unet_feeds(inputs, sample, timestep, encoder_hidden_states, args, kwargs)
            if feeds is None:  # inputs the IR does not take: this call on torch
                return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
            out = self._run("unet", unet, feeds, lambda: _UNetIO(unet, original))
            if out is None:  # the conversion failed just now: torch from here on
                return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
            import torch

            out = torch.from_numpy(out).to(sample.dtype)
            if kwargs.get("return_dict", True):
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

                return UNet2DConditionOutput(sample=out)
            return (out,)

        with _forward_replaced(unet, forward):
            yield

    @contextmanager
    def decoder(self, vae):
        """Within the block, ``vae``'s decoder (latents after ``post_quant_conv`` -> pixels; TAESD's tiny decoder,
        latents -> pixels) runs on OpenVINO; tiled decodes call it per tile, each tile shape compiled once."""
        decoder = getattr(vae, "decoder", None)
        name = "taesd_decoder" if hasattr(decoder, "layers") else "vae_decoder"  # diffusers' DecoderTiny / Decoder
        if name in self.failed or decoder is None or not hasattr(decoder, "up_blocks" if name == "vae_decoder"
                                                                 else "layers"):
            yield  # other VAEs stay on torch
            return
        original = decoder.forward

        def forward(sample, *args):  # (sample, latent_embeds=None): a Decoder's; (x): a DecoderTiny's
            import torch

            if any(a is not None for a in args) or sample.dtype != torch.float32 or name in self.failed:
                return original(sample, *args)
            out = self._run(name, decoder, {"sample": sample.numpy()}, lambda: _DecoderIO(decoder, original))
            return original(sample, *args) if out is None else torch.from_numpy(out)

        with _forward_replaced(decoder, forward):
            yield

    @contextmanager
    def text_encoders(self, parts):
        """Within the block, each text encoder's passes (one chunk of token ids, as ``engine.prompts`` encodes)
        run on OpenVINO. The token embedding lookup stays on torch, so textual-inversion vectors (placed by a hook
        on that layer, ``prompts._embedding_vectors``) go in as they do on torch; the IR starts from the token
        embeddings and gives back every hidden state (clip skip), the last one normed and the pooled output."""
        with ExitStack() as stack:
            for name in ("text_encoder", "text_encoder_2"):
                te = getattr(parts, name, None)
                if te is not None and name not in self.failed and hasattr(te, "get_input_embeddings"):
                    stack.enter_context(self._text_encoder(name, te))
            yield

    @contextmanager
    def _text_encoder(self, name: str, te):
        original = te.forward

        def forward(*args, **kwargs):
            import torch

            input_ids = args[0] if len(args) == 1 else None
            if input_ids is None or set(kwargs) - {"output_hidden_states", "return_dict"} or \
                    kwargs.get("return_dict") is False or input_ids.device.type != "cpu" or \
                    te.dtype != torch.float32 or name in self.failed:
                return original(*args, **kwargs)
            embeds = te.get_input_embeddings()(input_ids)  # (its hooks: an embedding's vectors in their places)
            feeds = {"input_ids": input_ids.to(torch.int64).numpy(), "inputs_embeds": embeds.float().contiguous()
                     .numpy()}
            out = self._run(name, te, feeds, lambda: _TextIO(te, original), every=True)
            if out is None:  # the conversion failed just now: torch from here on
                return original(*args, **kwargs)
            last, pooled, *hidden = (torch.from_numpy(o) for o in out)
            hidden = tuple(hidden) if kwargs.get("output_hidden_states") else None
            if hasattr(te, "text_projection"):  # CLIPTextModelWithProjection (SDXL's bigG)
                from transformers.models.clip.modeling_clip import CLIPTextModelOutput

                return CLIPTextModelOutput(text_embeds=pooled, last_hidden_state=last, hidden_states=hidden)
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)

        with _forward_replaced(te, forward):
            yield

    def take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    # -- inside ------------------------------------------------------------------------------------------------

    def _unet_feeds(self, inputs, sample, timestep, encoder_hidden_states, args, kwargs) -> dict | None:
        import torch

        if args or encoder_hidden_states is None or sample.dtype != torch.float32 or sample.device.type != "cpu":
            return None
        added = kwargs.get("added_cond_kwargs") or {}
        # every other input given (ControlNet residuals, the x4 upscaler's class labels, attention masks and
        # kwargs) is one the IR does not take; and the IR's own extra inputs must all be there
        given = {k for k, v in kwargs.items() if v is not None and k not in ("added_cond_kwargs", "return_dict")}
        if given | set(added) != set(inputs):
            return None
        batch = sample.shape[0]
        feeds = {"sample": sample, "timestep": torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
                 .expand(batch).contiguous(), "encoder_hidden_states": encoder_hidden_states}
        for name in inputs:
            feeds[name] = added[name] if name in _XL_INPUTS else kwargs[name]
        return {name: value.to(torch.float32).contiguous().numpy() for name, value in feeds.items()}

    def _run(self, name: str, module, feeds: dict, wrapper, every: bool = False):
        shapes = tuple((k, tuple(v.shape)) for k, v in feeds.items())
        with self._lock:
            compiled = self._compiled.get(name)
            if compiled is None or compiled[0] != shapes:
                try:
                    compiled = (shapes, self._compile(name, module, feeds, wrapper))
                except Exception as error:  # one line, never a traceback: that component stays on torch
                    log.debug("OpenVINO could not take the %s", name, exc_info=True)  # BRUSHWORK_DEBUG shows it
                    why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
                    self.failed[name] = why
                    self.notes.append(f"OpenVINO could not take the {_LABEL[name]} ({why}); it runs on torch")
                    return None
                self._compiled[name] = compiled
        result = compiled[1](feeds)
        return result.to_tuple() if every else result[0]

    def _spill(self, name: str, module) -> None:
        """torch's copy of a converted component's weights moved out of memory: saved once beside its IR
        (``torch.pt``) and mapped back from there (``torch.load(mmap=True)``), so they take no memory of their
        own; pages are read back only where torch runs the component again (a LoRA request, fast mode,
        ControlNet) and can be dropped again under memory pressure. A module that carries adapters (peft's
        LoRA layers) or whose file does not match keeps its weights in memory."""
        import torch

        folder = self._folders.get(name)
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        if folder is None or any("lora_" in k or "base_layer" in k for k in tensors) or \
                any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32)
                    for t in tensors.values()):  # (integer buffers, as CLIP's position ids, map as they are)
            return
        path = folder / "torch.pt"
        try:
            if not path.is_file():
                partial = path.with_name(f".torch.pt.partial-{os.getpid()}")
                torch.save({k: t.detach() for k, t in tensors.items()}, partial)
                os.replace(partial, path)  # whole or not at all
            mapped = torch.load(path, mmap=True, weights_only=True)
            if set(mapped) != set(tensors) or any(mapped[k].shape != t.shape for k, t in tensors.items()):
                log.debug("%s does not match the %s's weights; they stay in memory", path, name)
                return
            with torch.no_grad():
                for key, t in tensors.items():
                    t.data = mapped[key]
        except (OSError, RuntimeError) as error:  # a full disk, say: the weights stay in memory, nothing else
            log.debug("could not map the %s's torch weights from %s: %s", name, path, error)
            return
        del tensors
        _give_back_freed_memory()


    def _compile(self, name: str, module, feeds: dict, wrapper):
        import openvino as ov

        model = self._ir.get(name)
        if model is None:
            model = self._ir[name] = self._read_or_convert(name, module, feeds, wrapper)
        if name not in self._spilled:  # before compiling: torch's copy and the compiled one are never both in memory
            self._spilled.add(name)
            self._spill(name, module)
        model = model.clone()
        model.reshape({model.input(k).get_any_name(): ov.PartialShape(list(v.shape)) for k, v in feeds.items()})
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads > 0:
            config["INFERENCE_NUM_THREADS"] = self.threads
        compiled = self.core().compile_model(model, "CPU", config)
        self.stats["compiled"] += 1
        if name in self._folders:
            _page_out(self._folders[name] / "model.bin")
        return compiled

    def core(self):
        if self._core is None:
            import openvino as ov

            self._core = ov.Core()
            kernels = self.cache_dir / "kernels"
            kernels.mkdir(parents=True, exist_ok=True)
            self._core.set_property({"CACHE_DIR": str(kernels)})
        return self._core

    def _read_or_convert(self, name: str, module, feeds: dict, wrapper):
        import openvino as ov

        folder = self.cache_dir / f"{name}-{fingerprint(module, tuple(feeds), ov.__version__)}"
        self._folders[name] = folder
        xml = folder / "model.xml"
        if xml.is_file():
            self.stats["loaded_from_cache"] += 1
            return self.core().read_model(xml)
        import torch

        # said before, not only after: a full-size UNet takes minutes, and the run seems to hang meanwhile
        log.warning("OpenVINO: converting the %s once for this model (%s; cached in %s; --backend torch skips it)",
                    _LABEL[name], _TAKES.get(name, "minutes for a full-size one"), folder.parent)
        started = time.perf_counter()
        example = {k: torch.from_numpy(v) for k, v in feeds.items()}
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent branches are not the user's
            model = ov.convert_model(wrapper(), example_input=example)
        for port, key in zip(model.inputs, feeds, strict=True):
            port.get_tensor().set_names({key})
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        ov.save_model(model, partial / "model.xml", compress_to_fp16=False)
        (partial / "about.json").write_text(json.dumps({"component": name, "inputs": list(feeds),
                                                        "openvino": ov.__version__, "format": FORMAT}, indent=1))
        try:
            partial.rename(folder)  # whole or not at all: a killed conversion leaves no half IR to reuse
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(partial, ignore_errors=True)
        seconds = time.perf_counter() - started
        self.stats["converted"] += 1
        self.stats["convert_s"] += seconds
        self.notes.append(f"OpenVINO: the {_LABEL[name]} was converted once ({seconds:.0f} s) and cached in "
                          f"{folder.parent}")
        # the converted model shares memory with torch's tensors; the saved one, read back, maps its own file, so
        # torch's copy can leave memory (``_spill``)
        del model
        return self.core().read_model(folder / "model.xml")


@contextmanager
def _forward_replaced(module, forward):
    """``module``'s calls go to ``forward`` within the block: an instance attribute shadows the class's forward
    (its hooks still run, as ``engine.hooks``), removed again whatever happens."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _give_back_freed_memory() -> None:
    """Return the heap that freed tensors leave to the system (glibc keeps it otherwise); elsewhere nothing."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _page_out(path: Path) -> None:
    """Drop the pages of ``path``'s read-only mappings from memory (Linux ``madvise(MADV_PAGEOUT)``). The IR's
    weights file is mapped by OpenVINO and read while it compiles, which repacks the weights into its own memory:
    the file's pages would then count as the process's memory (a second copy of the weights in its RSS) until the
    system needs them. Clean file pages come back from disk if anything reads them again; elsewhere nothing."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            ranges = [line.split()[0] for line in f if line.rstrip("\n").endswith(str(path))]
        if not ranges:
            return
        libc = _libc()
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for span in ranges:
            start, end = (int(x, 16) for x in span.split("-"))
            libc.madvise(start, end - start, 21)  # MADV_PAGEOUT (Linux 5.4+; older kernels refuse it: nothing)
    except (OSError, AttributeError, ValueError):
        pass


_LABEL = {"unet": "UNet", "vae_decoder": "VAE decoder", "taesd_decoder": "tiny VAE decoder (TAESD)",
          "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
# how long a conversion takes here, where not minutes
_TAKES = {"taesd_decoder": "about half a minute", "text_encoder": "seconds", "text_encoder_2": "about half a minute"}


def unet_inputs(unet) -> tuple[str, ...]:
    """The inputs beyond (sample, timestep, encoder_hidden_states) this UNet takes: SDXL's pooled text and size
    ids, LCM's guidance embedding."""
    config = unet.config
    inputs: tuple[str, ...] = ()
    if getattr(config, "addition_embed_type", None) == "text_time":
        inputs += _XL_INPUTS
    if getattr(config, "time_cond_proj_dim", None):
        inputs += _LCM_INPUTS
    return inputs


def fingerprint(module, inputs: tuple, version: str) -> str:
    """A SHA-256 of the module's weights (every byte), its config, the inputs the IR takes, OpenVINO's version and
    this file's format: the same model always finds its conversion, a fine-tune never finds another's."""
    import torch

    digest = hashlib.sha256(json.dumps({"format": FORMAT, "openvino": version, "inputs": list(inputs),
                                        "class": type(module).__name__,
                                        "config": _config_of(module)}, sort_keys=True, default=str).encode())
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str((data.dtype, tuple(data.shape))).encode())
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest.update(memoryview(data.numpy()).cast("B"))
    return digest.hexdigest()[:24]


def _config_of(module) -> dict:
    config = getattr(module, "config", None)  # diffusers' bookkeeping ("_use_default_values", a set) left out
    if config is None:
        return {}
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' / diffusers' config
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _UNetIO(unet, forward):  # noqa: N802 (a module class made where torch is imported)
    """The UNet with flat inputs and one output, for tracing; ``forward`` is its own (not the patched) forward."""
    import torch

    class UNetIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None,
                    timestep_cond=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
            return forward(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                           added_cond_kwargs=added, return_dict=False)[0]

    return UNetIO().eval()


def _TextIO(te, forward):  # noqa: N802
    """A text encoder from its token embeddings (``inputs_embeds``, as its embedding layer gave them) and the ids
    (where the end token is, for the pooled output), to (last hidden state, pooled output or projection, every
    hidden state): its own forward, its embedding layer swapped for the given tensor while it is traced."""
    import torch

    class Given(torch.nn.Module):
        def __init__(self, tensor):
            super().__init__()
            self.tensor = tensor

        def forward(self, input_ids):
            return self.tensor

    class TextIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.te = te

        def forward(self, input_ids, inputs_embeds):
            layer = te.get_input_embeddings()
            te.set_input_embeddings(Given(inputs_embeds))
            try:
                out = forward(input_ids, output_hidden_states=True, return_dict=True)
            finally:
                te.set_input_embeddings(layer)
            pooled = out.text_embeds if hasattr(te, "text_projection") else out.pooler_output
            return (out.last_hidden_state, pooled, *out.hidden_states)

    return TextIO().eval()


def _DecoderIO(decoder, forward):  # noqa: N802
    import torch

    class DecoderIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, sample):
            return forward(sample)

    return DecoderIO().eval()


# ---- per run ---------------------------------------------------------------------------------------------------


def unet_context(accel, unet, *, reasons: list[str]):
    """What ``RunContext.run_pipe`` wraps a denoising loop in: the OpenVINO UNet unless a reason keeps it on torch
    (said once per run in the notes)."""
    return nullcontext() if accel is None or _said_on_torch(accel, "UNet", reasons) else accel.unet(unet)


def _said_on_torch(accel, what: str, reasons: list[str]) -> bool:
    """Whether ``reasons`` keep ``what`` on torch for this request; said once per run in the notes."""
    if not reasons:
        return False
    note = f"OpenVINO: the {what} runs on torch for this request ({', '.join(reasons)})"
    if note not in accel.notes:
        accel.notes.append(note)
    return True


def for_model(policy, settings):
    """The backend object of a model that has just loaded with this policy (None: torch), made once per model."""
    if policy.backend != "openvino":
        return None
    from ..settings import Settings

    settings = settings or Settings.load()
    return OpenVinoModel(Path(settings.cache_dir) / "openvino", threads=settings.threads)


def text_context(accel, parts, *, reasons: list[str]):
    """What a prompt's encoding is wrapped in: the OpenVINO text encoders of ``parts`` unless a reason (a LoRA on
    them) keeps them on torch for this request (said once per run)."""
    if accel is None or _said_on_torch(accel, "text encoder", reasons):
        return nullcontext()
    return accel.text_encoders(parts)


def decoder_context(accel, vae):
    """What the final decode is wrapped in: the OpenVINO decoder of ``vae`` where its model has the backend."""
    return nullcontext() if accel is None else accel.decoder(vae)
