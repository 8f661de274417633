"""The CPU backends (engine/backends.py): OpenVINO's UNet and VAE decoder against torch's on the bundled mini model,
the conversion cache, and a backend that is missing or fails (one note, torch's picture, never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brushwork import Engine, GenerationRequest, Settings
from brushwork.engine import device
from brushwork.errors import InvalidRequest

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'brushwork[openvino]'")

MINI = Path(__file__).resolve().parents[1] / "src/brushwork/models/mini/mini.safetensors"
# OpenVINO computes the same fp32 convolutions and attention in another order: at most 1/255 per pixel channel
TOLERANCE = 1


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One home for the module, so its conversions are made once and the later tests read them from the cache."""
    return tmp_path_factory.mktemp("ovhome")


def _engine(home, backend):
    return Engine(Settings(home=home, backend=backend))


PROMPT = "a red circle in the center, on a white background"


def _run(engine, **extra):
    request = GenerationRequest(prompt=PROMPT, model=str(MINI), steps=3,
                                seed=5, watermark=False, **extra)
    return engine.generate(request)


def _resident_kb(suffix: str) -> dict[str, int]:
    """{path: kB of it in this process's memory} for the mapped files whose path ends with ``suffix``."""
    out, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's first line
            current = fields[-1] if len(fields) == 6 and fields[-1].endswith(suffix) else None
        elif current and line.startswith("Rss:"):
            out[current] = out.get(current, 0) + int(fields[1])
    return out


@pytest.fixture(scope="module")
def torch_picture(shared_home):
    return np.asarray(_run(_engine(shared_home / "torch", "torch")).images[0]).astype(int)


def test_openvino_draws_torch_s_picture_and_a_second_process_reads_the_cache(shared_home, torch_picture, tmp_path,
                                                                             caplog):
    with caplog.at_level("WARNING", logger="brushwork.backends"):
        engine = _engine(shared_home, "openvino")  # kept: its compiled models hold the IR's file mapped
        first = _run(engine)
    # said as the conversion starts (it takes minutes for a full-size model), once per component
    assert [r.getMessage().split(" once")[0] for r in caplog.records] == [
        "OpenVINO: converting the text encoder", "OpenVINO: converting the UNet", "OpenVINO: converting the VAE decoder"]
    picture = np.asarray(first.images[0]).astype(int)
    assert picture.shape == torch_picture.shape
    assert np.abs(picture - torch_picture).max() <= TOLERANCE
    converted = [n for n in first.notes if "converted once" in n]
    assert [n.split(" was")[0] for n in converted] == [
        "OpenVINO: the text encoder", "OpenVINO: the UNet", "OpenVINO: the VAE decoder"], first.notes
    cached = sorted(p.name.split("-")[0] for p in (shared_home / "cache/openvino").iterdir() if p.name != "kernels")
    assert cached == ["text_encoder", "unet", "vae_decoder"]
    # torch's copy of the converted weights takes no memory of its own: it is mapped from the cache's file
    maps = Path("/proc/self/maps").read_text()
    for folder in (shared_home / "cache/openvino").glob("*-*"):
        assert (folder / "torch.pt").is_file() and str(folder / "torch.pt") in maps, folder
    # nor does the IR's weights file OpenVINO maps and reads as it compiles (its own repacked copy is what runs)
    if sys.platform == "linux" and os.uname().release.split(".")[:2] >= ["5", "4"]:
        resident = _resident_kb("model.bin")
        assert len(resident) == 3, resident  # the text encoder's, the UNet's, the VAE decoder's
        for path, kb in resident.items():
            assert kb < Path(path).stat().st_size / 1024 / 4, (path, kb)
    del engine

    again = _engine(shared_home, "openvino")  # a new engine: nothing in memory, everything on disk
    second = _run(again)
    assert not [n for n in second.notes if "converted" in n], second.notes
    stats = again._loaded.parts.backend.stats
    assert stats["converted"] == 0 and stats["loaded_from_cache"] == 3
    assert np.array_equal(np.asarray(second.images[0]), np.asarray(first.images[0]))

    # another process (its own hash seed, nothing shared but the disk): the CLI reads the same conversions
    out = tmp_path / "cli"
    done = subprocess.run([str(Path(sys.executable).parent / "brushwork"), "txt2img", PROMPT, "--model", str(MINI), "--steps",
                           "3", "--seed", "5", "--no-watermark", "--backend", "openvino", "--n-samples", "1",
                           "--outdir", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BRUSHWORK_HOME": str(shared_home)})
    assert done.returncode == 0, done.stderr
    assert "OpenVINO" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    cli_picture = next(out.rglob("*.png"))
    assert np.array_equal(np.asarray(Image.open(cli_picture).convert("RGB")), np.asarray(first.images[0]))


def test_the_tiny_decoder_runs_on_openvino_too_and_draws_torch_s_picture(tmp_path):
    """``--vae taesd`` (a tiny TAESD in vae-approx/, the original layout): the final decode is converted as its own
    component and gives torch's picture; its previews stay on torch."""
    from test_taesd import save_tiny, tiny_autoencoder, vae_approx

    pictures, engines = {}, {}
    for backend in ("torch", "openvino"):
        home = tmp_path / backend
        save_tiny(tiny_autoencoder(stages=3), vae_approx(home) / "taesd_decoder.pth")
        engines[backend] = _engine(home, backend)
        result = _run(engines[backend], vae="taesd")
        assert "VAE: taesd," in result.infotexts[0]
        pictures[backend] = np.asarray(result.images[0]).astype(int)
    assert np.abs(pictures["openvino"] - pictures["torch"]).max() <= TOLERANCE
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "openvino/cache/openvino").iterdir()
                    if p.name != "kernels")
    assert cached == ["taesd_decoder", "text_encoder", "unet"]  # the full VAE decoder never ran, so never converted


def test_a_run_that_changes_the_unet_s_insides_stays_on_torch_and_says_so(shared_home):
    fast = _run(_engine(shared_home, "openvino"), fast=True)
    plain = _run(_engine(shared_home / "torch-fast", "torch"), fast=True)
    assert [n for n in fast.notes if "OpenVINO" in n] == [
        "OpenVINO: the UNet runs on torch for this request (fast mode)"]
    # the UNet is torch's, the decoder OpenVINO's
    assert np.abs(np.asarray(fast.images[0]).astype(int) - np.asarray(plain.images[0]).astype(int)).max() <= TOLERANCE


def test_a_failing_conversion_keeps_torch_with_one_line(tmp_path, monkeypatch, torch_picture):
    import openvino

    def broken(*args, **kwargs):
        raise RuntimeError("cannot convert this module\nsecond line of detail")

    monkeypatch.setattr(openvino, "convert_model", broken)
    result = _run(_engine(tmp_path / "home", "openvino"))
    failed = [n for n in result.notes if "OpenVINO" in n]
    assert failed == [f"OpenVINO could not take the {what} (RuntimeError: cannot convert this module); it runs on torch"
                      for what in ("text encoder", "UNet", "VAE decoder")]
    assert np.array_equal(np.asarray(result.images[0]).astype(int), torch_picture)  # exactly torch's


def test_a_missing_openvino_falls_back_with_one_line(tmp_path, monkeypatch, torch_picture):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    result = _run(_engine(tmp_path / "home", "openvino"))
    notes = [n for n in result.notes if "OpenVINO" in n]
    assert notes == ["OpenVINO is not installed (pip install 'brushwork[openvino]'); torch runs instead"]
    assert np.array_equal(np.asarray(result.images[0]).astype(int), torch_picture)


def test_the_policy_names_the_backend_and_why(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(device, "memory_available", lambda: 16 * 2**30)
    large, small = 860_000_000, 1_000_000
    auto = device.choose("cpu", "auto", unet_params=large)
    assert auto.backend == "openvino" and "OpenVINO" in auto.why and auto.dtype_name == "fp32"
    assert device.choose("cpu", "auto", unet_params=small).backend == "torch"  # a conversion would not pay
    assert device.choose("cpu", "auto", unet_params=large, backend="torch").backend == "torch"
    monkeypatch.setattr(device, "memory_available", lambda: 4 * 2**30)  # no room for a second copy of the UNet
    tight = device.choose("cpu", "auto", unet_params=large)
    assert tight.backend == "torch" and "4.0 GB of memory free" in tight.why
    monkeypatch.setattr(device, "memory_available", lambda: None)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)  # bf16 by torch: measured 1.74x there
    native = device.choose("cpu", "auto", unet_params=large)
    assert (native.backend, native.dtype_name) == ("torch", "bf16")
    asked = device.choose("cpu", "auto", unet_params=large, backend="openvino")
    assert (asked.backend, asked.dtype_name) == ("openvino", "fp32")
    with pytest.raises(InvalidRequest, match="OpenVINO backend computes in fp32"):
        device.choose("cpu", "bf16", unet_params=large, backend="openvino")
    with pytest.raises(InvalidRequest, match="unknown backend 'onnx'; choose one of: auto, torch, openvino"):
        device.choose("cpu", "auto", backend="onnx")


def test_a_bad_backend_setting_is_one_line(monkeypatch, tmp_path):
    from brushwork.request import BrushworkError

    monkeypatch.setenv("BRUSHWORK_BACKEND", "tensorrt")
    with pytest.raises(BrushworkError, match="setting backend must be auto, torch or openvino, got 'tensorrt'"):
        Settings.load(home=tmp_path)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_text_encoders_on_openvino_give_torch_s_embeddings_with_clip_skip_and_an_embedding(
        family, tiny, tmp_path):
    """A prompt's encoding (A1111's chunks, weights, clip skip) with the text encoders on OpenVINO: torch's
    numbers, a textual-inversion embedding's vectors included (they go in through torch's embedding layer)."""
    import torch
    from safetensors.torch import save_file

    from brushwork.engine import backends, prompts
    from brushwork.models.embeddings import EmbeddingLibrary, text_encoders
    from brushwork.models.load import load_single_file
    from brushwork.models.store import ModelStore
    from tinymodels import save_xl_single

    path = tiny["sd1"]["safetensors"] if family == "sd1" else save_xl_single(tmp_path / "xl.safetensors")
    parts = load_single_file(path)
    library = tmp_path / "models"
    (library / "embeddings").mkdir(parents=True)
    widths = dict(text_encoders(parts))
    vectors = {kind or "emb_params": torch.randn((2, width), generator=torch.Generator().manual_seed(7))
               for kind, width in widths.items()}
    save_file(vectors, library / "embeddings" / "shinystyle.safetensors")
    db = EmbeddingLibrary(ModelStore(Settings(home=tmp_path / "home", models_dir=library))).for_model(parts)
    assert "shinystyle" in db.loaded

    def encode(accel, prompt, clip_skip):
        options = dict(clip_skip=clip_skip, embeddings=db)
        with accel.text_encoders(parts) if accel is not None else nullcontext():
            if parts.family.xl:
                return prompts.encode_xl(parts.encoders, prompt, "blurry, ugly", **options)
            return prompts.encode(parts.text_encoder, parts.tokenizer, prompt, "blurry, ugly", **options)

    accel = backends.OpenVinoModel(tmp_path / "cache")
    # two chunks; no emphasis: "Original" restores each chunk's mean, and a mean near 0 (after clip skip's final
    # norm) turns any rounding into a visible scale, on torch against torch too
    prompt = "a shinystyle lighthouse, " + "waves " * 80
    for clip_skip in (1, 2):
        on_torch, on_openvino = encode(None, prompt, clip_skip), encode(accel, prompt, clip_skip)
        assert len(on_torch) == len(on_openvino)
        for a, b in zip(on_torch, on_openvino, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4), (clip_skip, (a - b).abs().max())
    # the embedding's vectors did go in: without them the encoding differs
    plain = encode(accel, prompt.replace("shinystyle", "shiny style"), 1)
    assert not torch.allclose(plain[0], encode(None, prompt, 1)[0], atol=1e-3)
    assert accel.stats["converted"] == (2 if family == "sdxl" else 1) and not accel.failed, accel.failed
    assert accel.stats["compiled"] == accel.stats["converted"]  # one shape (a chunk), compiled once


def test_a_lora_on_the_text_encoder_keeps_it_on_torch_and_says_so(tmp_path):
    from brushwork.engine import backends

    accel = backends.OpenVinoModel(tmp_path)
    with backends.text_context(accel, object(), reasons=["a LoRA on the text encoder"]):
        pass
    assert accel.notes == ["OpenVINO: the text encoder runs on torch for this request (a LoRA on the text encoder)"]
    assert accel.stats["converted"] == 0
