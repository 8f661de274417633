"""``brushwork batch``: a JSON Lines file of native job bodies -> pictures with their parameters and a manifest;
a rerun does only what is missing, bad lines are errors that stop nothing, and Ray Data makes the same pictures.

The bundled mini model (a fresh home has no other), 64x64, a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from brushwork.batch import Item, read_manifest
from brushwork.cli import main

SMALL = {"steps": 4, "width": 64, "height": 64}
CIRCLE = "a red circle on the left, on a white background"
SQUARE = "a blue square on the right, on a white background"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_local_batch_writes_pictures_with_parameters_and_a_manifest_and_a_rerun_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # without --ray, Ray is never imported: `import ray` would fail
    jobs = write_lines(tmp_path / "jobs.jsonl", [
        {"prompt": CIRCLE, "seed": 7, **SMALL},
        {"id": "squares", "prompt": SQUARE, "seed": 3, "batch_size": 2, **SMALL},
    ])
    out = tmp_path / "out"
    result = run("batch", jobs, "--out", out)
    assert result.exit_code == 0, result.output
    records = read_manifest(out / "manifest.jsonl")
    assert [(r["line"], r["seeds"], r["error"]) for r in records] == [(1, [7], None), (2, [3, 4], None)]
    assert records[1]["id"] == "squares" and len(records[0]["id"]) == 16  # its own id, else a hash of the line
    assert records[0]["timings"]["total_s"] > 0
    assert result.stdout.split() == [str(out / name) for r in records for name in r["files"]]
    for record, prompt in zip(records, (CIRCLE, SQUARE), strict=True):
        for name, seed in zip(record["files"], record["seeds"], strict=True):
            text = Image.open(out / name).info["parameters"]
            assert text.startswith(f"{prompt}\nSteps: 4, ") and f"Seed: {seed}, Size: 64x64" in text
            assert "Model: mini" in text
    before = sorted(p.name for p in (out / "txt2img").iterdir())
    assert len(before) == 3

    again = run("batch", jobs, "--out", out)  # everything is on record: nothing runs, nothing is added
    assert again.exit_code == 0, again.output
    assert "2 of 2 requests already done" in again.stderr and again.stdout == ""
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (out / "txt2img").iterdir()) == before


def test_a_batch_line_makes_the_same_picture_as_txt2img(tmp_path):
    cli = run("txt2img", CIRCLE, "--seed", 11, "--steps", 4, "-W", 64, "-H", 64, "--outdir", tmp_path / "cli", "-q")
    assert cli.exit_code == 0, cli.output
    (cli_png,) = cli.stdout.split()
    jobs = write_lines(tmp_path / "one.jsonl", [{"prompt": CIRCLE, "seed": 11, **SMALL}])
    result = run("batch", jobs, "--out", tmp_path / "batch", "-q")
    assert result.exit_code == 0, result.output
    (batch_png,) = result.stdout.split()
    assert np.array_equal(pixels(batch_png), pixels(cli_png))
    assert Image.open(batch_png).info["parameters"] == Image.open(cli_png).info["parameters"]


def test_a_killed_batch_resumes_with_only_the_missing_lines(tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    jobs = write_lines(tmp_path / "jobs.jsonl", [
        {"id": i, "prompt": CIRCLE if n % 2 else SQUARE, "seed": n, **SMALL, "steps": 10} for n, i in enumerate(ids)])
    out = tmp_path / "out"
    manifest = out / "manifest.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "brushwork.cli", "batch", str(jobs), "--out", str(out), "-q",
                             "--threads", "1"],  # as the tests in this process: threads fight over 2 cores
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not read_manifest(manifest) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # mid-run, as a crash or a pulled plug
    finally:
        proc.wait()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    finished = read_manifest(manifest)
    assert 1 <= len(finished) < len(ids), stderr
    kept = {out / name: (out / name).stat().st_mtime_ns for r in finished for name in r["files"]}
    pending = [i for i in ids if i not in {r["id"] for r in finished}]
    # what a kill can also leave: a picture written but not yet on record, and a record torn half-way
    from brushwork.output.files import write_linked

    write_linked(b"not on record", out / "txt2img", lambda n: f"{n:05d}-99.png", tag=Item(0, pending[0]).tag)
    with open(manifest, "ab") as f:
        f.write(json.dumps({"id": pending[-1], "line": 5, "files": ["txt2img/00009-4.png"]}).encode()[:30])

    result = run("batch", jobs, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == len(pending)  # only the missing lines ran
    records = read_manifest(manifest)
    assert sorted(r["id"] for r in records) == ids and all(r["error"] is None for r in records)
    assert len(manifest.read_text().splitlines()) == len(ids) + 1  # the torn line stays, ignored, on its own
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # the finished pictures were not redone
    pictures = sorted((out / "txt2img").glob("*.png"))
    assert len(pictures) == len(ids) and not list(out.rglob(".tmp-*"))  # each picture once, no leftovers
    assert sorted(out / name for r in records for name in r["files"]) == pictures


def test_bad_lines_are_errors_naming_the_line_and_the_others_still_run(tmp_path):
    jobs = write_lines(tmp_path / "jobs.jsonl", [
        {"prompt": CIRCLE, "seed": 1, **SMALL},
        {"prompt": CIRCLE, "promt": "typo", **SMALL},
        {"prompt": CIRCLE, **SMALL, "width": 500},
        "this line is not JSON",
        "",
        {"id": "x", "prompt": SQUARE, "seed": 2, **SMALL},
        {"id": "x", "prompt": SQUARE, "seed": 3, **SMALL},
        '{"prompt": "a circle", "cfg_scale": NaN}',
    ])
    out = tmp_path / "out"
    result = run("batch", jobs, "--out", out, "-q")
    assert result.exit_code == 1
    assert len(result.stdout.split()) == 2  # lines 1 and 6 made their pictures
    errors = {r["line"]: r["error"] for r in read_manifest(out / "manifest.jsonl") if r["error"]}
    assert sorted(errors) == [2, 3, 4, 7, 8]
    assert "unknown field 'promt'" in errors[2]
    assert errors[3] == "width 500 is not a multiple of 8; use 496 or 504"
    assert "not JSON" in errors[4]
    assert "id 'x' is line 6's too" in errors[7]
    assert "NaN" in errors[8]
    assert "line 2: error: unknown field 'promt'" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 5 request(s) failed (line 2, 3, 4, 7, 8)")
    assert "Traceback" not in result.output

    again = run("batch", jobs, "--out", out, "-q")  # still refused, and said again, but not recorded twice
    assert again.exit_code == 1 and "line 2: error: unknown field 'promt'" in again.stderr
    assert again.stdout == "" and len(read_manifest(out / "manifest.jsonl")) == 7


@pytest.mark.parametrize("content,needle", [
    (None, "batch file not found"),
    ("a red circle\na blue square\n", "is not JSON Lines: line 1 is not JSON"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "is not UTF-8 text"),
    ("\n\n", "holds no requests"),
])
def test_a_missing_or_non_json_file_is_one_line_error(tmp_path, content, needle):
    path = tmp_path / "jobs.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = run("batch", path, "--out", tmp_path / "out")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_ray_data_with_two_actors_makes_the_same_pictures_as_the_local_run(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'brushwork[ray]')")
    jobs = write_lines(tmp_path / "jobs.jsonl", [
        {"prompt": CIRCLE if n % 2 else SQUARE, "seed": 20 + n, **SMALL} for n in range(4)])
    local = run("batch", jobs, "--out", tmp_path / "local", "-q")
    assert local.exit_code == 0, local.output
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # pragma: no cover (a machine where Ray cannot start)
        pytest.skip(f"Ray cannot start here: {str(err).splitlines()[0][:200]}")
    try:
        result = run("batch", jobs, "--ray", "--actors", 2, "--out", tmp_path / "ray", "-q")
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    by_id = {r["id"]: r for r in read_manifest(tmp_path / "local" / "manifest.jsonl")}
    remote = read_manifest(tmp_path / "ray" / "manifest.jsonl")
    assert sorted(r["id"] for r in remote) == sorted(by_id) and all(r["error"] is None for r in remote)
    workers, here = {r["worker"] for r in remote}, {r["worker"] for r in by_id.values()}
    assert len(workers) == 2 and not workers & here  # made by the two actors, not in this process
    for record in remote:
        mine = by_id[record["id"]]
        assert record["seeds"] == mine["seeds"]
        (a,), (b,) = record["files"], mine["files"]
        assert np.array_equal(pixels(tmp_path / "ray" / a), pixels(tmp_path / "local" / b))


def test_the_batch_command_imports_neither_torch_nor_ray_until_it_runs():
    code = ("import sys; from click.testing import CliRunner; from brushwork.cli import main; import brushwork.batch; "
            "r = CliRunner().invoke(main, ['batch', '--help']); "
            "print(r.exit_code, '--ray' in r.output, 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["0", "True", "False", "False"], out.stderr


@pytest.mark.parametrize("cluster,nodes,asked,expected", [
    ({"CPU": 16, "GPU": 4}, 2, {}, (4, 1, 1)),  # one engine per GPU
    ({"CPU": 32}, 2, {}, (2, 16, 0)),  # no GPU: one engine per machine, with its cores
    ({"CPU": 2}, 1, {"actors": 2}, (2, 1, 0)),
    ({"CPU": 8, "GPU": 2}, 1, {"num_gpus": 0.5}, (4, 1, 0.5)),  # two engines share each GPU
])
def test_ray_actors_default_to_one_per_gpu_else_one_per_machine(cluster, nodes, asked, expected):
    from brushwork.batch import plan_actors

    plan = plan_actors(cluster, nodes, **asked)
    assert (plan.actors, plan.cpus, plan.gpus) == expected


def test_a_wrong_actor_count_is_one_line_error(tmp_path):
    jobs = write_lines(tmp_path / "jobs.jsonl", [{"prompt": CIRCLE, **SMALL}])
    result = run("batch", jobs, "--ray", "--actors", 0, "--out", tmp_path / "out")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == ["error: --actors must be 1 or more, got 0"]
    assert not (tmp_path / "out").exists()
