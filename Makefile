# make demo  -> sets up .venv and draws pictures offline with the bundled mini model into outputs/
# make test  -> sets up .venv and runs the whole suite offline
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (here it lies on disk; plain `torch` would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
# Upscaler models load through spandrel; its torchvision requirement would pull a CUDA torch, and only two of its
# architectures (not upscalers) use torchvision, so it is installed without its dependencies (engine/upscalers.py)
SPANDREL ?= spandrel==0.4.2
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: setup browser postgres s3 demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-deps "$(SPANDREL)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/brushwork txt2img "a red circle on the left and a blue square on the right, on a white background" --seed 1 --n-samples 4
	$(VENV)/bin/brushwork txt2img "a yellow triangle in the center, on a purple background" --seed 2 --n-samples 4
	$(VENV)/bin/brushwork txt2img "a green square at the top, on a black background" --seed 3 --n-samples 4
	@echo "pictures are in outputs/txt2img (grids in outputs/txt2img-grids)"

test: setup browser postgres s3
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# The web UI tests drive Debian's chromium; install it where this machine can (root and apt-get).
# Elsewhere those tests are skipped, and the run ends with one line saying so and how to install it.
browser:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing chromium (Debian's) for the web UI tests" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium could not be installed here; the web UI tests will be skipped"

# The PostgreSQL job-store tests start a throwaway server from Debian's postgresql binaries; installed the same way.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing postgresql (Debian's) for the job-store tests" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "note: postgresql could not be installed here; the PostgreSQL job-store tests will be skipped"

# The pictures' bucket tests run against a real S3-compatible store: OpenStack Swift with its s3api (Debian's).
s3:
	@command -v swift-proxy-server >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing swift (Debian's, an S3-compatible store) for the bucket tests" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      swift-proxy swift-object swift-container swift-account >/dev/null; } || \
	  echo "note: swift could not be installed here; the S3 bucket tests will be skipped"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) outputs .pytest_cache
