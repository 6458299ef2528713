"""fbh: the leaderboard harness for deep model fusion.

The data flows one way:
spec (YAML) -> validated config (harness.spec) -> model pool (harness.pool)
-> fusion method (methods/, via harness.registry) -> evaluation (harness.evaluate)
-> result rows -> DuckDB (harness.store) -> site (harness.site).
harness.runner wires those stages together; harness.cli is a thin shell over it.
"""

__version__ = "0.1.0"
