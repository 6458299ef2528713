"""Model recombination: a model whose every unit comes from a randomly chosen expert.

Tang et al., FusionBench "model recombination" (fusion_bench.method.ModelRecombinationAlgorithm).
FusionBench arXiv:2406.03280

Units are transformer blocks (granularity='layer': all entries under one '...layers.<i>.'
prefix travel together, other entries one by one) or single state-dict entries
(granularity='entry', FusionBench's state-dict recombination). For each unit the experts
are shuffled with Python's random.Random(seed) and the first one is taken, so
granularity='entry' reproduces FusionBench's first recombined model for the same seed.
(Averaging all recombined models would give back the simple average, so one is returned.)
"""

import random
import re
from typing import Literal

from harness.api import FusionContext, Params, method

BLOCK = re.compile(r"^(.*layers\.\d+)\.")


class RecombinationParams(Params):
    granularity: Literal["layer", "entry"] = "layer"


def unit_of(key: str, granularity: str) -> str:
    match = BLOCK.match(key) if granularity == "layer" else None
    return match.group(1) if match else key


@method("model_recombination", params=RecombinationParams, category="mixing", stochastic=True)
def model_recombination(ctx: FusionContext, p: RecombinationParams):
    experts, rng = ctx.experts, random.Random(ctx.seed)
    chosen: dict[str, int] = {}
    out = {}
    for key in ctx.base:
        unit = unit_of(key, p.granularity)
        if unit not in chosen:
            order = list(range(len(experts)))
            rng.shuffle(order)
            chosen[unit] = order[0]
        out[key] = experts[chosen[unit]][key].clone()
    return out
