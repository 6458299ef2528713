"""`fbh export`: a leaderboard entry's fused model as a model folder others can load, with a card.

The submission's stored run (setting 'all', on the suite's current fingerprint) names the method, the
hyperparameters it ran with (the selected grid point included) and the seed; the same fusion runs again
here, isolated as in a submit, on the same inputs (the fingerprint must match, as for `fbh reproduce`),
and the merged model is saved with transformers' `save_pretrained` (safetensors) beside a README.md
model card holding the method, hyperparameters, fingerprint, inputs and the stored scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.errors import FbhError
from harness.store import Store

PUSH_FIX = "log in with `hf auth login` (or set HF_TOKEN) on a machine that reaches the hub, or export without it"


@dataclass
class Exported:
    out: Path
    run_id: str
    files: list[str]


def stored_run(store: Store, submission: str, suite: str) -> dict:
    """The submission's latest completed leaderboard run of setting 'all' on the suite's ranked fingerprint."""
    runs = store.query("SELECT * FROM runs WHERE kind = 'submission' AND submission = ? AND suite = ? AND setting = 'all' "
                       "AND status = 'ok' AND NOT coalesce(superseded, false) AND example_limit IS NULL "
                       "AND fingerprint IS NOT DISTINCT FROM "
                       "(SELECT fingerprint FROM suites WHERE name = ?) ORDER BY finished_at DESC LIMIT 1",
                       [submission, suite, suite])
    if not runs:
        names = [r["submission"] for r in store.query("SELECT DISTINCT submission FROM runs WHERE suite = ? AND "
                                                      "kind = 'submission' AND status = 'ok'", [suite])]
        raise FbhError(f"no completed run of submission '{submission}' on suite '{suite}'", field="SUBMISSION",
                       fix=f"submit it first, or use one of: {', '.join(sorted(names)) or '(none yet)'}")
    return runs[0]


def export(store: Store, submission: str, suite: str, out: Path, *, device: str = "cpu", progress=print,
           push_to_hub: str | None = None) -> Exported:
    from harness import registry
    from harness.isolation import isolated_fuse
    from harness.reproduce import require_same_inputs
    from harness.runner import open_suite
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FbhError("the output folder is not empty", file=str(out), field="--out",
                       fix="name a new or empty folder; nothing was written")
    token = _hub_token() if push_to_hub else None  # refused before any work when it cannot be pushed
    run = stored_run(store, submission, suite)
    job = require_same_inputs(run, progress)
    info = registry.get(run["method"])
    if info.output != "merged":
        raise FbhError(f"method '{info.name}' makes a {info.output} model, not one of the base architecture",
                       field="SUBMISSION", fix="export a merging method's entry (an ensemble is its experts; a "
                                               "larger model has modules of the method's own)")
    params = info.validate_params(json.loads(run["params"]))
    handle = open_suite(suite, device, progress)
    progress(f"[{suite}] fusing {submission} again ({info.name}, {json.dumps(params.model_dump(mode='json'))})")
    fused = isolated_fuse(handle, list(job.seen), info, params, run["seed"] or 0, device,
                          budget=handle.spec.fusion_budget_seconds, progress=progress)
    model = handle.family.build(fused.value)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text(model_card(store, run, handle.spec, info, params.model_dump(mode="json")))
    if push_to_hub:
        from huggingface_hub import HfApi
        api = HfApi(token=token)
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=str(out))
    return Exported(out, run["run_id"], sorted(p.name for p in out.iterdir()))


def _hub_token() -> str:
    from huggingface_hub import get_token
    token = get_token()
    if not token:
        raise FbhError("no HuggingFace token to push with", field="--push-to-hub", fix=PUSH_FIX)
    return token


def model_card(store: Store, run: dict, spec, info, params: dict) -> str:
    rows = store.query("SELECT task, metric, value, ci_low, ci_high FROM results WHERE run_id = ? AND condition = "
                       "'clean' ORDER BY task", [run["run_id"]])
    inputs = json.loads(run["inputs"]) if run.get("inputs") else {}
    lines = ["---", "library_name: transformers", f"tags: [merge, model-fusion, fbh, {info.name}]",
             f"base_model: {json.dumps(str(spec.family.base))}", "---", "",
             f"# {run['submission']}: {info.name} of the {spec.name} experts", "",
             f"Fused by fbh with method `{info.name}` ({info.reference}).", "",
             "| field | value |", "|---|---|",
             f"| suite | `{spec.name}` |", f"| fingerprint | `{run['fingerprint']}` |",
             f"| hyperparameters | `{json.dumps(params, sort_keys=True)}` |", f"| seed | {run['seed']} |",
             f"| run | `{run['run_id']}` ({run['finished_at']}) |", f"| fbh commit | `{run['git_commit']}` |",
             f"| data used | {run['data_access']} |", "", "## Inputs", ""]
    lines += [f"- `{ref}`: `{identity}`" for ref, identity in sorted(inputs.items())]
    lines += ["", "## Scores (clean test sets, 95% bootstrap intervals)", "", "| task | metric | value | 95% CI |",
              "|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['value']:.2f} | "
              + ("" if r["ci_low"] is None else f"{r['ci_low']:.2f}-{r['ci_high']:.2f}") + " |" for r in rows]
    return "\n".join(lines) + "\n"
