"""Run a rank script as ``__main__``, then leave through :func:`autoep.shutdown`.

For scripts this project cannot edit (``../shared/peer-bench/autoep_bench.py`` ends with a plain
``destroy_process_group``): their ranks then exit without gloo's exit-time abort (see autoep.teardown).

    torchrun --nproc-per-node 4 benchmarks/then_shutdown.py SCRIPT [ARGS...]
"""

import runpy
import sys

import autoep

script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
autoep.shutdown()
