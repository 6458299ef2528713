"""fbh: the leaderboard harness for deep model fusion.

The data flows one way:
spec (YAML) -> validated config (harness.spec) -> model pool (harness.pool)
-> fusion method (methods/, via harness.registry) -> evaluation (harness.evaluate)
-> result rows -> DuckDB (harness.store) -> site (harness.site).
harness.runner wires those stages together; harness.cli is a thin shell over it.
"""

__version__ = "0.1.0"

import os as _os

# PyTorch's OpenMP threads spin-wait between parallel regions by default; on a machine whose
# cores are shared with other work (2 cores, several jobs) the spinning threads steal each
# other's time and a forward pass ran ~10x slower. Sleeping instead costs microseconds per
# region when the cores are free. libgomp reads this once, when torch is first imported, so
# it is set here, before any harness module imports torch; a value already set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
