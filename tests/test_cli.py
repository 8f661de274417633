"""The brushwork command as a person uses it: files, metadata, research-script flags, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from brushwork.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, brushwork.cli; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    out = subprocess.run([sys.executable, "-m", "brushwork.cli", "--help"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and "txt2img" in out.stdout and "img2img" in out.stdout


def test_research_script_flags_write_numbered_pngs_with_parameters(tiny, tmp_path):
    result = run("txt2img", "--prompt", "hello world", "--plms", "--ckpt", tiny["sd1"]["ckpt"], "--skip_grid",
                 "--n_samples", 2, "--ddim_steps", 3, "--scale", 5, "--H", 32, "--W", 48, "--seed", 42, "--outdir",
                 tmp_path / "out", "--no-watermark")
    assert result.exit_code == 0, result.output
    paths = [Path(p) for p in result.stdout.split()]
    assert [p.name for p in paths] == ["00000-42.png", "00001-43.png"]
    assert not (tmp_path / "out" / "txt2img-grids").exists()
    image = Image.open(paths[1])
    assert image.size == (48, 32)
    text = image.info["parameters"]
    assert text.startswith("hello world\nSteps: 3, Sampler: PLMS, CFG scale: 5, Seed: 43, Size: 48x32, Model hash: ")
    assert "Model: tiny-sd1" in text and "Version: brushwork" in text


def test_names_never_overwrite_and_grid_is_written(tiny, tmp_path):
    for _ in range(2):
        result = run("txt2img", "a cat", "--model", tiny["sd1"]["safetensors"], "--steps", 2, "-W", 32, "-H", 32,
                     "-n", 2, "--seed", 5, "--outdir", tmp_path, "--quiet", "--no-watermark")
        assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "txt2img").iterdir())
    assert files == ["00000-5.png", "00001-6.png", "00002-5.png", "00003-6.png"]
    grids = sorted(p.name for p in (tmp_path / "txt2img-grids").iterdir())
    assert grids == ["00000-grid.png", "00001-grid.png"]
    assert Image.open(tmp_path / "txt2img-grids" / "00000-grid.png").size == (64, 32)


def test_info_prints_the_parameters_back(tiny, tmp_path):
    result = run("txt2img", "a dog", "-N", "blurry, dark", "--model", tiny["sd1"]["safetensors"], "--steps", 2,
                 "-W", 32, "-H", 32, "--seed", 9, "--sampler", "DPM++ 2M Karras", "--outdir", tmp_path, "-q")
    path = result.stdout.split()[0]
    text = run("info", path)
    assert text.exit_code == 0
    assert text.stdout.startswith("a dog\nNegative prompt: blurry, dark\nSteps: 2, Sampler: DPM++ 2M, "
                                  "Schedule type: Karras, CFG scale: 7, Seed: 9")
    data = json.loads(run("info", path, "--json").stdout)
    assert data["Seed"] == "9" and data["Negative prompt"] == "blurry, dark" and data["Model"] == "tiny-sd1"


def test_a1111s_sigma_schedules_from_the_cli(tiny, tmp_path):
    result = run("txt2img", "a dog", "--model", tiny["sd1"]["safetensors"], "--steps", 2, "-W", 32, "-H", 32,
                 "--seed", 9, "--sampler", "DPM++ 2M", "--scheduler", "align_your_steps", "--outdir", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    text = Image.open(result.stdout.split()[0]).info["parameters"]
    assert "Steps: 2, Sampler: DPM++ 2M, Schedule type: Align Your Steps, CFG scale: 7, Seed: 9" in text


def test_img2img_research_flags(tiny, tmp_path):
    init = tmp_path / "bird.png"
    Image.new("RGB", (41, 35), (200, 100, 50)).save(init)
    result = run("img2img", "--prompt", "A bird", "--ckpt", tiny["sd1"]["safetensors"], "--init-img", init,
                 "--strength", 0.8, "--ddim_steps", 3, "--outdir", tmp_path / "o", "--seed", 3, "-q")
    assert result.exit_code == 0, result.output
    out = Image.open(result.stdout.split()[0])
    assert out.size == (40, 32)  # its own size rounded down to 8
    assert "Denoising strength: 0.8" in out.info["parameters"]


def _one_line_error(result, *needles):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args,needles", [
    (["--model", "/nope/missing.ckpt"], ["not found"]),
    (["-W", 500], ["not a multiple of 8", "496 or 504"]),
    (["-W", 100000], ["too large"]),
    (["--steps", 0], ["steps"]),
    (["--sampler", "euler_b"], ["unknown sampler 'euler_b'", "Euler a"]),
    (["--sampler", "Euler a", "--scheduler", "KL Optimal"], ["sampler Euler a does not support the KL Optimal"]),
    (["--cfg-end", 1.5], ["CFG end must be above 0 and at most 1"]),
    (["--device", "cpu", "--precision", "fp16"], ["does not run on a CPU", "fp32"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, needles):
    args = [str(a) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny["sd1"]["safetensors"])]
    result = run("txt2img", "a cat", "--outdir", tmp_path / "out", *args)
    _one_line_error(result, *needles)
    assert not (tmp_path / "out").exists()


def test_broken_files_are_one_line_errors(tiny, tmp_path):
    broken = tmp_path / "half.safetensors"
    data = tiny["sd1"]["safetensors"].read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    _one_line_error(run("txt2img", "x", "--model", broken, "--outdir", tmp_path / "o"), "truncated")
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    _one_line_error(run("img2img", "x", "--init-img", not_image, "--model", tiny["sd1"]["safetensors"],
                        "--outdir", tmp_path / "o"), "not an image")
    _one_line_error(run("img2img", "x", "--init-img", not_image, "--strength", 2, "--model",
                        tiny["sd1"]["safetensors"]), "not an image")
    assert not (tmp_path / "o").exists()


def test_models_convert_turns_a_trusted_pickle_into_safetensors(tiny, tmp_path):
    import shutil

    ckpt = tmp_path / "trusted.ckpt"
    shutil.copy(tiny["sd1"]["ckpt"], ckpt)
    result = run("models", "convert", ckpt)
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.split()[-1])
    assert out.suffix == ".safetensors"
    a = run("txt2img", "x", "--model", ckpt, "--steps", 2, "-W", 32, "-H", 32, "--seed", 1, "--outdir", tmp_path / "a",
            "-q", "--no-watermark")
    b = run("txt2img", "x", "--model", out, "--steps", 2, "-W", 32, "-H", 32, "--seed", 1, "--outdir", tmp_path / "b",
            "-q", "--no-watermark")
    assert np.array_equal(np.asarray(Image.open(a.stdout.split()[0])), np.asarray(Image.open(b.stdout.split()[0])))


def test_models_hash_is_a1111s(tmp_path):
    import hashlib

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"brushwork" * 1000)
    result = run("models", "hash", f)
    assert result.stdout.split()[0] == hashlib.sha256(f.read_bytes()).hexdigest()[:10]


def test_watermark_is_on_by_default_and_one_switch_turns_it_off(tiny, tmp_path):
    common = ["--model", tiny["sd1"]["safetensors"], "--steps", 2, "-W", 64, "-H", 64, "--seed", 4, "-q"]
    marked = run("txt2img", "a cat", *common, "--outdir", tmp_path / "a").stdout.split()[0]
    plain = run("txt2img", "a cat", *common, "--outdir", tmp_path / "b", "--no-watermark").stdout.split()[0]
    jpeg = tmp_path / "marked.jpg"
    Image.open(marked).save(jpeg, quality=90)
    out = run("watermark", "detect", marked, plain, jpeg)
    assert out.exit_code == 0
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"{marked}: brushwork watermark")
    assert lines[1].startswith(f"{plain}: no known watermark")
    assert lines[2].startswith(f"{jpeg}: brushwork watermark")


def test_from_file_runs_each_prompt_and_n_rows_shapes_the_grid(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    result = run("txt2img", "--from-file", prompts, "--model", tiny["sd1"]["safetensors"], "--steps", 1, "-W", 32,
                 "-H", 32, "-n", 2, "--n_rows", 2, "--seed", 1, "--outdir", tmp_path / "o", "-q", "--no-watermark")
    assert result.exit_code == 0, result.output
    texts = [Image.open(tmp_path / "o" / "txt2img" / f"0000{i}-{s}.png").info["parameters"].split("\n")[0]
             for i, s in ((0, 1), (2, 1))]
    assert texts == ["a red circle", "a blue square"]
    assert Image.open(tmp_path / "o" / "txt2img-grids" / "00000-grid.png").size == (32, 64)


def test_fast_mode_is_in_the_parameters_and_they_remake_the_same_picture(tiny, tmp_path):
    from brushwork.engine.core import Engine
    from brushwork.output.infotext import request_from_infotext
    from brushwork.request import GenerationRequest
    from brushwork.settings import Settings

    result = run("txt2img", "a fox", "--model", tiny["sd1"]["safetensors"], "--steps", 6, "--sampler", "Euler",
                 "-W", 32, "-H", 32, "--seed", 5, "--fast", "--outdir", tmp_path, "--skip-grid", "-q")
    assert result.exit_code == 0, result.output
    picture = Image.open(result.stdout.split()[0])
    text = picture.info["parameters"]
    assert "Fast mode: 3" in text
    kwargs = request_from_infotext(text)
    assert kwargs["fast"] == 3
    kwargs["model"] = str(tiny["sd1"]["safetensors"])
    again = Engine(Settings(home=tmp_path / "home")).generate(GenerationRequest(**kwargs, watermark=True))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(picture.convert("RGB")))


@pytest.mark.parametrize(("env", "needle"), [({"BRUSHWORK_THREADS": "many"}, "setting threads must be a whole number"),
                                             ({}, "--threads must be 1 or more")])
def test_wrong_thread_counts_are_one_line_errors(tiny, tmp_path, monkeypatch, env, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = ["txt2img", "x", "--model", tiny["sd1"]["safetensors"], "--outdir", tmp_path]
    result = run(*args) if env else run(*args, "--threads", 0)
    _one_line_error(result, needle)
    assert not list(tmp_path.glob("*.png"))


def test_models_list_names_each_models_family(tiny, tmp_path, monkeypatch):
    import shutil

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(tiny["sd2-inpaint"]["safetensors"], home / "models" / "repaint.safetensors")
    monkeypatch.setenv("BRUSHWORK_HOME", str(home))
    result = run("models", "list")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "repaint" in x)
    assert line.split()[:3] == ["repaint", "sd2-inpaint", "safetensors"]


def test_debug_shows_the_error_with_its_cause(tiny, tmp_path, monkeypatch):
    broken = tmp_path / "half.safetensors"
    data = tiny["sd1"]["safetensors"].read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    args = ("txt2img", "x", "--model", broken, "--outdir", tmp_path / "o")
    assert "Traceback" not in run(*args).output  # one line by default
    monkeypatch.setenv("BRUSHWORK_DEBUG", "1")
    result = run(*args)
    assert result.exit_code != 0
    # the library's error keeps what safetensors said underneath (raise ... from err)
    assert "Traceback" in result.output and "direct cause" in result.output, result.output[-800:]
    assert result.output.strip().splitlines()[-1].startswith("error:") and "truncated" in result.output
