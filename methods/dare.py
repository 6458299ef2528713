"""DARE: drop and rescale each task vector at random, then merge.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch", ICML 2024. arXiv:2311.03099

Every task vector tau_t keeps each entry with probability 1 - sparsity_ratio and is
rescaled by 1/(1 - sparsity_ratio); the sparse task vectors are then merged by
`merge`: task_arithmetic (base + lambda * sum), simple_average (base + lambda * mean;
lambda defaults to 1, i.e. an average of the dropped experts) or ties (TIES trim,
elect, disjoint merge, with this method's top_k / disjoint_merge). Defaults are
FusionBench's configs (sparsity 0.5; lambda 0.3 for TA, 0.5 for TIES with sum merge and
top 20%). Masks are drawn from the run's seed, expert by expert, entry by entry, so the
same seed gives the same model. Unlike FusionBench's only_on_linear_weights option,
every floating entry is dropped (a state dict does not say which entries are Linear).
"""

from typing import Literal, Optional

from pydantic import Field

from harness.api import FusionContext, Params, method
from harness.registry import Properties
from harness.tensors import apply_delta
from methods._common import random_drop, sum_task_vectors
from methods.ties_merging import TiesParams, ties_delta

DEFAULT_SCALING = {"task_arithmetic": 0.3, "simple_average": 1.0, "ties": 0.5}


class DareParams(Params):
    merge: Literal["task_arithmetic", "simple_average", "ties"] = "task_arithmetic"
    sparsity_ratio: float = Field(0.5, ge=0.0, lt=1.0, description="probability of dropping each entry")
    rescale: bool = True
    scaling_factor: Optional[float] = Field(None, ge=0.0, le=10.0,
                                            description="lambda; default 0.3 (TA), 1.0 (average), 0.5 (TIES)")
    top_k: float = Field(0.2, gt=0.0, le=1.0, description="merge=ties only: fraction kept by TIES")
    disjoint_merge: Literal["mean", "sum"] = Field("sum", description="merge=ties only")


def dare_task_vectors(ctx: FusionContext, p: DareParams):
    g = ctx.generator()
    return [random_drop(tv, p.sparsity_ratio, p.rescale, g) for tv in ctx.task_vectors()]


@method("dare", params=DareParams, category="merging", stochastic=True,
        properties=Properties(scaling_zero={"scaling_factor": 0.0},
                              one_expert={"sparsity_ratio": 0.0, "scaling_factor": 1.0},
                              order_invariant=False, why="masks are drawn expert by expert from one seeded generator"))
def dare(ctx: FusionContext, p: DareParams):
    base, tvs = ctx.base, dare_task_vectors(ctx, p)
    lam = DEFAULT_SCALING[p.merge] if p.scaling_factor is None else p.scaling_factor
    if p.merge == "ties":
        sparse_experts = [{k: base[k].float() + d for k, d in tv.items()} for tv in tvs]
        ties = TiesParams(top_k=p.top_k, disjoint_merge=p.disjoint_merge)
        return apply_delta(base, ties_delta(base, sparse_experts, ties), lam)
    delta = sum_task_vectors(tvs)
    if p.merge == "simple_average":
        delta = {k: v / len(tvs) for k, v in delta.items()}
    return apply_delta(base, delta, lam)
