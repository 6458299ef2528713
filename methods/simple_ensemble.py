"""Simple ensemble: keep every expert and average their predictions.

Sagi & Rokach, "Ensemble learning: A survey", WIREs Data Mining and Knowledge
Discovery 8(4), 2018. doi:10.1002/widm.1249
"""

from harness.api import Ensemble, FusionContext, method
from harness.registry import NoParams


@method("simple_ensemble", params=NoParams, category="ensemble", output="ensemble")
def simple_ensemble(ctx: FusionContext, params: NoParams):
    return Ensemble(members=ctx.experts, reduce="mean")
