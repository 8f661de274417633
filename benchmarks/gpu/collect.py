"""The GPU check's bookkeeping, for run.sh: the machine's description, and after every part the files in $OUT.

    python benchmarks/gpu/collect.py env WORK              # WORK/env.json: Python, torch, CUDA, packages, GPU
    python benchmarks/gpu/collect.py summary WORK OUT      # OUT/summary.json and each part's JSON; prints a summary

Only the standard library (and torch for ``env``): it must run even when the project's packages do not import.
Each part writes into WORK; this copies the results into OUT, where at most 8 files come back (run.sh's log, this
summary, pytest.xml and one JSON per benchmark: unet, step, image (its three parts: sd15, sd21, sdxl), upscale,
compile: all 8 of them). A part that was stopped by its timeout before writing its JSON gets one rebuilt from the
JSON lines it printed (marked ``"partial": true``); a part that did not run gets one saying why. So every part's
file is there whatever happened after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# part -> (its JSON in WORK, the file in OUT); the image parts share one file in OUT
PARTS = {
    "pytest": ("pytest.xml", "pytest.xml"),
    "unet": ("unet.json", "unet.json"),
    "step": ("step.json", "step.json"),
    "image_sd15": ("image_sd15.json", "image.json"),
    "image_sd21": ("image_sd21.json", "image.json"),
    "image_sdxl": ("image_sdxl.json", "image.json"),
    "upscale": ("upscale.json", "upscale.json"),
    "compile": ("compile.json", "compile.json"),
}
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "safetensors", "tokenizers",
            "numpy", "pillow", "pytest", "triton", "fastapi", "pydantic", "torchsde")


def env(work: Path) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info: dict = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
    for name in PACKAGES:
        try:
            info["packages"][name] = version(name)
        except PackageNotFoundError:
            info["packages"][name] = None
    for name in ("diffusers", "transformers"):  # where each really comes from (carried wheels or the machine's)
        try:
            module = __import__(name)
            info.setdefault("imported_from", {})[name] = str(Path(module.__file__).parent)
        except Exception as err:  # reported, not fatal
            info.setdefault("import_errors", {})[name] = f"{type(err).__name__}: {err}"[:500]
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                           "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                           "cudnn": torch.backends.cudnn.version()}
    except Exception as err:
        info["torch_error"] = f"{type(err).__name__}: {err}"[:500]
        info["cuda_available"] = False
    try:
        query = "name,memory.total,driver_version,clocks.max.sm,power.limit"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"not available: {err}"
    for extra in ("install.txt", "pins.txt"):
        if (work / extra).exists():
            info[extra.split(".")[0]] = (work / extra).read_text().strip().splitlines()
    (work / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---- reading what the parts left --------------------------------------------------------------------------------


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def merge(into: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value
    return into


def from_log(log: Path) -> dict:
    """The JSON objects a benchmark printed (one line each, as it measured), merged."""
    out: dict = {}
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                merge(out, json.loads(line))
            except ValueError:
                pass
    return out


def junit(path: Path, log: Path) -> dict:
    """pytest's junit XML as a JSON summary; without it (killed), the outcomes the -v log printed."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        root = None
    if root is None:
        tests = {}
        try:
            for line in log.read_text(errors="replace").splitlines():
                for outcome in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS"):
                    if "::" in line and f" {outcome}" in line:
                        tests[line.split(" ")[0]] = outcome.lower()
        except OSError:
            pass
        counts: dict = {}
        for outcome in tests.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return {"source": "log (no junit XML: the run was stopped)", "counts": counts, "tests": tests}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        if case.get("name") is None:  # the test that was running when the timeout stopped pytest
            cases.append({"test": "(the test running when the part's timeout stopped it)", "outcome": "interrupted"})
            continue
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:1500]
                break
        out = case.find("system-out")
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": round(float(case.get("time") or 0), 2), **({"message": message} if message else {}),
                      **({"stdout": out.text[-1500:]} if out is not None and out.text else {})})
    counts: dict = {}
    for case in cases:
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
    return {"source": "junit", "counts": counts, "time_s": float(suite.get("time") or 0), "tests": cases}


# ---- summary ------------------------------------------------------------------------------------------------------


def highlights(files: dict) -> dict:
    """The numbers worth reading first, per benchmark."""
    out: dict = {}
    for key, entry in (files.get("unet.json") or {}).items():
        if key.startswith("unet_") and isinstance(entry, dict):
            out[key] = {name: {k: v.get(k) for k in ("steps_per_s", "median_s", "rel_error_vs_fp32", "peak_vram_gb",
                                                     "speedup_vs_diffusers_fp16", "error") if k in v}
                        for name, v in entry.items() if isinstance(v, dict)}
    for key, entry in (files.get("compile.json") or {}).items():
        if key.startswith("unet_") and isinstance(entry, dict):
            out[f"compile_{key}"] = {name: {k: v.get(k) for k in ("compile_s", "steps_per_s", "status", "error",
                                                                  "speedup_vs_brushwork_eager") if k in v}
                                     for name, v in entry.items() if name.startswith("compiled_")}
    for key, entry in (files.get("step.json") or {}).items():
        if key.startswith(("unet_cuda", "vae_decode_cuda")) and isinstance(entry, dict):
            out[f"step_{key}"] = {name: entry[name].get("median_s") for name in ("diffusers", "brushwork")
                                  if isinstance(entry.get(name), dict)}
    for key, entry in (files.get("image.json") or {}).items():
        if key.startswith("gpu_") and isinstance(entry, dict):
            out[key] = {name: {k: v.get(k) for k in ("it_s", "s", "peak_vram_gb", "error") if k in v}
                        for name, v in entry.items() if isinstance(v, dict) and name.startswith(("diffusers",
                                                                                                  "brushwork"))}
    upscale = files.get("upscale.json") or {}
    for key, entry in upscale.items():  # "512->2048": {"plain": ..., "brushwork": ...}
        if "->" in key and isinstance(entry, dict):
            out[f"upscale_{key}"] = {name: {k: v.get(k) for k in (
                "memory", "steps", "total_s", "extrapolated_total_s_at_20_steps", "peak_vram_allocated_gb",
                "peak_vram_reserved_gb", "under_4gb_vram", "peak_rss_mb", "not_run", "error") if k in v}
                for name, v in entry.items() if name in ("plain", "brushwork") and isinstance(v, dict)}
    return out


def summary(work: Path, out: Path) -> dict:
    env_info = load_json(work / "env.json") or {}
    statuses: dict = {}
    try:
        for line in (work / "parts.jsonl").read_text().splitlines():
            record = json.loads(line)
            statuses[record["part"]] = record
    except (OSError, ValueError):
        pass
    files: dict = {}
    for part, (src, dest) in PARTS.items():
        status = statuses.get(part, {"part": part, "state": "not run (yet)"})
        if part == "pytest":
            if (work / src).exists():
                (out / dest).write_bytes((work / src).read_bytes())
            files["pytest"] = junit(work / src, work / "pytest.log")
            continue
        data = load_json(work / src)
        if data is None:
            recovered = from_log(work / f"{part}.log")
            if recovered:
                data = {"partial": True, "why": f"{part} wrote no JSON ({status.get('state')}); these are the "
                                                "results it printed before it stopped", **recovered}
            else:
                data = {"part": part, "no_results": ": ".join(str(status[k]) for k in ("state", "note")
                                                              if status.get(k))}
        data["_part_status"] = status
        if dest == "image.json":  # the three image parts, one file
            merged = files.setdefault(dest, {"benchmark": "image", "parts": {}})
            merged["parts"][part] = {k: data.get(k) for k in ("steps", "wall_s", "peak_rss_mb", "partial", "why",
                                                              "no_results", "_part_status") if k in data}
            merged.setdefault("machine", data.get("machine"))
            merged.setdefault("steps", data.get("steps"))
            for key, value in data.items():
                if key.startswith("gpu_"):
                    merged[key] = value
        else:
            files[dest] = data
    for dest, data in files.items():
        if dest != "pytest":
            (out / dest).write_text(json.dumps(data, indent=2) + "\n")
    result = {
        "check": "brushwork GPU check (benchmarks/gpu/run.sh)",
        "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cuda": bool(env_info.get("cuda_available")),
        "env": env_info,
        "parts": statuses,
        "pytest": files.get("pytest"),
        "highlights": highlights(files),
    }
    if not result["cuda"]:
        result["note"] = "no CUDA device here: the GPU tests were skipped and the benchmarks not run"
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict) -> None:
    env_info = result["env"]
    gpu = env_info.get("gpu") or {}
    print("---- GPU check summary ----")
    print(f"cuda: {result['cuda']}  gpu: {gpu.get('name')}  torch: {env_info.get('packages', {}).get('torch')} "
          f"(CUDA {env_info.get('torch_cuda')})  diffusers: {env_info.get('packages', {}).get('diffusers')}")
    for name, status in result["parts"].items():
        print(f"  {name:<11} {status.get('state', '?'):<10} rc={status.get('rc')} {status.get('seconds', 0)} s"
              f" (limit {status.get('limit_s')} s)")
    tests = result.get("pytest") or {}
    print(f"pytest: {tests.get('counts')}")
    for case in tests.get("tests") or []:
        if isinstance(case, dict) and case["outcome"] in ("failed", "error"):
            print(f"  {case['outcome'].upper()} {case['test']}: {(case.get('message') or '')[:200]}")
    for key, entry in result["highlights"].items():
        print(f"{key}:")
        for name, values in entry.items():
            print(f"  {name:<26} {json.dumps(values)}")


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "env":
        info = env(Path(argv[1]))
        print(json.dumps({k: info.get(k) for k in ("python", "packages", "torch_cuda", "cuda_available", "gpu",
                                                   "imported_from", "import_errors", "nvidia_smi") if k in info}))
        return 0
    if len(argv) >= 3 and argv[0] == "summary":
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        result = summary(Path(argv[1]), out)
        if "--print" in argv:
            print_summary(result)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
