"""OpenCLIP suites, through the real code path: a tiny random open_clip model saved as open_clip
saves it (open_clip_config.json + safetensors), fine-tuned vision towers in the layouts the
experts come in, datasets from save_to_disk; then `submit` and checks against open_clip itself.

The `openclip` tests need the openclip extra, which lives in its own environment (README):
.ci/run makes it and runs `pytest -m openclip` there with FBH_REQUIRE_OPENCLIP=1."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO, save_random_image_datasets

TASKS = {"sun397": ["abbey", "airport", "bakery"], "eurosat": ["forest", "river"]}
TEMPLATES = ["a photo of a {c}.", "a satellite photo of the {c}."]
TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


# ----------------------------------------------------------------------------- base env

def test_suite_without_open_clip_is_unavailable_with_the_install_command(tmp_path, monkeypatch):
    """Whatever this environment has, a missing open_clip is reported, not crashed on."""
    import harness.suites
    real = harness.suites.importlib.util.find_spec
    monkeypatch.setattr(harness.suites.importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real(name, *a))
    from harness.cli import main
    from harness.families import OPENCLIP_INSTALL
    (tmp_path / "suites").mkdir()
    shutil.copy(REPO / "suites" / "openclip-vit-b-32-8tasks.yaml", tmp_path / "suites")
    shutil.copytree(REPO / "suites" / "_include", tmp_path / "suites" / "_include")  # the task files it includes
    monkeypatch.setenv("FBH_SUITES_DIR", str(tmp_path / "suites"))

    listed = CliRunner().invoke(main, ["suites", "list"]).output
    line = next(line for line in listed.splitlines() if line.startswith("openclip-vit-b-32-8tasks"))
    assert "unavailable" in line.split() and f"install the openclip extra: {OPENCLIP_INSTALL}" in line

    sub = str(REPO / "submissions" / "task_arithmetic.yaml")
    run = CliRunner().invoke(main, ["submit", sub, "--suite", "openclip-vit-b-32-8tasks",
                                    "--db", str(tmp_path / "r.duckdb")])
    assert run.exit_code == 2 and "Traceback" not in run.output, run.output
    assert "needs the 'open_clip' package" in run.output and OPENCLIP_INSTALL in run.output


def test_openclip_suites_follow_fusion_bench():
    from harness.spec import load_suite
    suite = load_suite(REPO / "suites" / "openclip-vit-b-32-8tasks.yaml")
    assert suite.family.kind == "open_clip_vision" and suite.family.heads == "zero_shot"
    assert suite.family.base == "timm/vit_base_patch32_clip_224.openai" and not suite.family.allow_pickle
    assert suite.family.experts["stanford-cars"] == \
        "../.cache/task_vectors_checkpoints/ViT-B-32/Cars/finetuned.safetensors"
    assert suite.task_names == ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert suite.references.published == []  # the paper has no OpenCLIP numbers


# ----------------------------------------------------------------------------- with open_clip

@pytest.fixture()
def zoo(tmp_path, private_env):
    """Base, two experts and two datasets on disk in the real formats, and a private env."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY).eval()
    base = tmp_path / "openclip-tiny"  # like a hub folder of open_clip weights (timm/..._clip_224.openai)
    base.mkdir()
    (base / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(base / "open_clip_model.safetensors"))
    experts = {}
    for i, task in enumerate(TASKS):
        g = torch.Generator().manual_seed(i)
        experts[task] = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in clip.visual.state_dict().items()}
    (tmp_path / "experts").mkdir()
    # The Task Arithmetic ImageEncoder's layout (model.visual.*, beside text entries) and a whole CLIP's (visual.*)
    save_file({"model.visual." + k: v for k, v in experts["sun397"].items()}
              | {"model.text_projection": clip.text_projection.detach().clone()},
              str(tmp_path / "experts" / "sun397.safetensors"))
    save_file({"visual." + k: v for k, v in experts["eurosat"].items()}, str(tmp_path / "experts" / "eurosat.safetensors"))
    save_random_image_datasets(tmp_path, TASKS)
    spec = {"name": "openclip-tiny", "family": {
                "kind": "open_clip_vision", "base": "../openclip-tiny", "heads": "zero_shot",
                "experts": {t: f"../experts/{t}.safetensors" for t in TASKS}},
            "tasks": [{"name": t, "dataset": f"../data/{t}", "validation_split": None, "classes": c,
                       "templates": TEMPLATES} for t, c in TASKS.items()],
            "references": {"computed": ["pretrained", "stl"]}}
    (tmp_path / "suites" / "openclip-tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path, clip, experts, spec


def submit(root, name: str, scaling_factor: float):
    from harness.runner import submit as run_submit
    sub = root / f"{name}.yaml"
    sub.write_text(yaml.safe_dump({"name": name, "method": "task_arithmetic",
                                   "params": {"scaling_factor": scaling_factor}}))
    return run_submit(sub, suites=["openclip-tiny"], db=root / "results.duckdb", device="cpu",
                      progress=lambda m: None)


def accuracies(root, label: str) -> dict[str, float]:
    from harness.store import Store
    store = Store(root / "results.duckdb")
    (run,) = store.query("SELECT * FROM runs WHERE label = ?", [label])
    assert run["status"] == "ok", run
    rows = store.query("SELECT * FROM results WHERE run_id = ?", [run["run_id"]])
    assert all(r["n"] == 12 and r["metric"] == "accuracy" for r in rows)
    return {r["task"]: r["value"] for r in rows}


def open_clip_accuracy(root, visual_state: dict | None) -> dict[str, float]:
    """Zero-shot accuracy computed with open_clip alone: its preprocess, tokenizer and towers."""
    import datasets
    import open_clip
    import torch
    import torch.nn.functional as F
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{root / 'openclip-tiny'}")
    if visual_state is not None:
        model.visual.load_state_dict(visual_state)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{root / 'openclip-tiny'}")
    out = {}
    with torch.no_grad():
        for task, classes in TASKS.items():
            head = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer(
                [t.replace("{c}", c) for t in TEMPLATES])), dim=-1).mean(0), dim=-1) for c in classes])
            test = datasets.load_from_disk(str(root / "data" / task))["test"]
            images = torch.stack([preprocess(im.convert("RGB")) for im in test["image"]])
            predicted = (F.normalize(model.encode_image(images), dim=-1) @ head.T).argmax(-1)
            out[task] = 100.0 * (predicted == torch.tensor(test["label"])).float().mean().item()
    return out


@pytest.mark.openclip
def test_task_arithmetic_on_an_openclip_suite(zoo):
    import torch
    root, clip, experts, _ = zoo
    report = submit(root, "ta-0", 0.0)
    assert {o.status for o in report.outcomes} == {"ok"}, report.outcomes
    pretrained = accuracies(root, "pretrained")
    assert pretrained == pytest.approx(open_clip_accuracy(root, None), abs=1e-6)
    assert accuracies(root, "ta-0") == pretrained  # scale 0: the base model, bit for bit
    stl = accuracies(root, "STL")
    assert stl == pytest.approx({t: open_clip_accuracy(root, experts[t])[t] for t in TASKS}, abs=1e-6)

    second = submit(root, "ta-1", 1.0).outcomes  # the references are cached by now
    assert {(o.label, o.status) for o in second} >= {("ta-1", "ok")}, second
    merged = {k: v + sum(e[k] - v for e in experts.values()) for k, v in clip.visual.state_dict().items()}
    assert accuracies(root, "ta-1") == pytest.approx(open_clip_accuracy(root, merged), abs=1e-6)
    assert merged["conv1.weight"].abs().sum() > 0 and not torch.equal(merged["proj"], clip.visual.proj)


@pytest.mark.openclip
def test_expert_weights_round_trip_and_pickles_need_opt_in(zoo):
    import torch
    from harness.errors import FbhError, SuiteUnavailable
    from harness.families import load_family
    from harness.spec import load_suite
    root, clip, experts, spec = zoo
    path = root / "suites" / "openclip-tiny.yaml"

    def family():
        return load_family(load_suite(path), path, None, torch.device("cpu"))

    loaded = family()
    assert set(loaded.base_state()) == set(clip.visual.state_dict())
    for task in TASKS:  # both layouts give the vision tower back exactly
        state = loaded.expert_state(task)
        assert state.keys() == experts[task].keys()
        assert all(torch.equal(state[k], experts[task][k]) for k in state)

    torch.save(experts["sun397"], root / "experts" / "sun397.pt")  # a pickled state dict
    spec["family"]["experts"]["sun397"] = "../experts/sun397.pt"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SuiteUnavailable) as refused:
        family().expert_state("sun397")
    assert refused.value.field == "family.experts.sun397" and "allow_pickle" in refused.value.fix
    spec["family"]["allow_pickle"] = True
    path.write_text(yaml.safe_dump(spec))
    opted_in = family().expert_state("sun397")
    assert all(torch.equal(opted_in[k], experts["sun397"][k]) for k in experts["sun397"])

    torch.save(clip.visual, root / "experts" / "sun397.pt")  # a pickled module: never unpickled
    with pytest.raises(FbhError, match="not a pickled state dict"):
        family().expert_state("sun397")
