# make demo  -> sets up .venv and draws pictures offline with the bundled mini model into outputs/
# make test  -> sets up .venv and runs the whole suite offline
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (here it lies on disk; plain `torch` would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/brushwork txt2img "a red circle on the left and a blue square on the right, on a white background" --seed 1 --n-samples 4
	$(VENV)/bin/brushwork txt2img "a yellow triangle in the center, on a purple background" --seed 2 --n-samples 4
	$(VENV)/bin/brushwork txt2img "a green square at the top, on a black background" --seed 3 --n-samples 4
	@echo "pictures are in outputs/txt2img (grids in outputs/txt2img-grids)"

test: setup
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) outputs .pytest_cache
