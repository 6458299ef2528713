"""Per-expert weights keyed by task name, shared by the weighted ensemble and weighted average.

Keying by task (not by position) makes a result independent of the order the experts
come in, and lets one submission serve settings that fuse only some of the tasks.
"""

from __future__ import annotations


def task_weights(tasks: list[str], weights: dict[str, float] | None, normalize: bool) -> list[float]:
    """One weight per task, in `tasks` order; uniform when weights is None."""
    if weights is None:
        values = [1.0] * len(tasks)
    else:
        missing = [t for t in tasks if t not in weights]
        if missing:
            raise ValueError(f"weights name no value for tasks {missing}; give one weight per task")
        values = [float(weights[t]) for t in tasks]
    if normalize or weights is None:
        total = sum(values)
        if total == 0:
            raise ValueError("weights sum to zero and cannot be normalized")
        values = [v / total for v in values]
    return values
