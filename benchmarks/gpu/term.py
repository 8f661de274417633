"""Run a Python script or module with SIGTERM turned into KeyboardInterrupt, so that `timeout` stops it the way
Ctrl-C would: pytest still writes its junit XML and the tests' summary, a benchmark unwinds its ``finally`` blocks.
(SIGINT itself may arrive ignored: a shell without job control starts background commands with SIGINT ignored,
and Python then never installs its handler.)

    python benchmarks/gpu/term.py -m pytest -m gpu tests/test_gpu.py
    python benchmarks/gpu/term.py benchmarks/step.py --device cuda
"""

from __future__ import annotations

import runpy
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path.insert(0, str(__import__("pathlib").Path(args[0]).resolve().parent))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
