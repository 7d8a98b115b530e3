"""The performance benchmark suite: ``python -m benchmarks`` runs them all and rewrites BENCHMARKS.md;
``python -m benchmarks.NAME`` runs one. See ``benchmarks/__main__.py``.

Run from the command line (``python -m benchmarks...``, before torch is imported), the suite asks
OpenMP to put idle threads to sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the caller chose a policy:
on a CPU shared with other jobs, OpenMP's default spin-waiting made a 2-thread composition of the
demo family 15 to 40 times slower than with one thread (BENCHMARKS.md, "Optimisations"), which would
drown every other figure in noise. The studio benchmark starts ``app.py`` with the caller's own
setting, so that figure is what users get.
"""

import os
import sys

SET_WAIT_POLICY = False
if (sys.argv and sys.argv[0] == "-m" and "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
        and os.environ.get("BENCHMARKS_OMP_DEFAULT") != "1"):  # a worker measuring OpenMP's own default
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    SET_WAIT_POLICY = True
