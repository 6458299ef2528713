"""Shared fixtures. The end-to-end fixtures build a shrunken tiny-vision zoo once per
test session in a temporary cache; nothing here touches the user's cache or DB."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SMALL_TASKS = ["digits", "shapes", "textures"]
SMALL_RECIPE = {
    "tasks": SMALL_TASKS, "n_train": 96, "n_validation": 32, "n_test": 48, "hidden_size": 32,
    "num_layers": 2, "num_heads": 2, "patch_size": 8, "finetune_lr": 4e-4, "pretrain_steps": 30, "pretrain_batch": 32, "finetune_steps": 15,
    "finetune_batch": 32, "mtl_steps": 15, "head_examples": 32,
}


def pytest_runtest_setup(item):
    """`openclip` tests need the openclip extra, which lives in its own environment (README): skipped
    in the base one, a failure where FBH_REQUIRE_OPENCLIP says it must be there (CI's second venv)."""
    if item.get_closest_marker("openclip") and importlib.util.find_spec("open_clip") is None:
        if os.environ.get("FBH_REQUIRE_OPENCLIP"):
            pytest.fail("open_clip is not installed, and FBH_REQUIRE_OPENCLIP=1 requires it")
        pytest.skip("needs the openclip extra (open_clip), installed in its own environment: see README")


@pytest.fixture(scope="module")
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a shared, loaded machine every op
    waits on descheduled threads (a 16-wide T5 forward: 0.75 s with 2, 15 ms with 1). A module asks for
    it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_suite_spec(name: str = "tiny-small") -> dict:
    return {
        "name": name,
        "title": "tiny-vision, shrunken for tests",
        "default": True,
        "family": {
            "kind": "clip_vision",
            "zoo": {"builder": "tiny_vision", "recipe": dict(SMALL_RECIPE)},  # a copy: tests mutate specs
            "base": "zoo://pretrained",
            "heads": "zoo://heads.safetensors",
            "experts": {t: f"zoo://experts/{t}" for t in SMALL_TASKS},
        },
        "tasks": [{"name": t, "dataset": f"zoo://data/{t}"} for t in SMALL_TASKS],
        "corruptions": [{"name": "gaussian_noise", "severity": 3}, {"name": "jpeg", "severity": 2}],
        "generalization": [{"name": "two-seen", "seen": SMALL_TASKS[:2], "unseen": SMALL_TASKS[2:]}],
        "references": {"computed": ["pretrained", "stl", "mtl"], "mtl": "zoo://mtl",
                       "published": [{"label": "Made-up paper row", "source": "test fixture, Table 0",
                                      "values": {t: 50.0 for t in SMALL_TASKS}}]},
    }


@pytest.fixture(scope="session")
def fbh_env(tmp_path_factory):
    """A private FBH_CACHE + FBH_SUITES_DIR holding the shrunken suite (zoo built once)."""
    root = tmp_path_factory.mktemp("fbh")
    suites = root / "suites"
    suites.mkdir()
    (suites / "tiny-small.yaml").write_text(yaml.safe_dump(small_suite_spec()))
    old = {k: os.environ.get(k) for k in ("FBH_CACHE", "FBH_SUITES_DIR", "FBH_DB", "FBH_SUBMISSIONS_DIR")}
    (root / "submissions").mkdir()  # tests submit copies of the shipped submissions under their names
    os.environ["FBH_SUBMISSIONS_DIR"] = str(root / "submissions")
    os.environ["FBH_CACHE"] = str(root / "cache")
    os.environ["FBH_SUITES_DIR"] = str(suites)
    os.environ["FBH_DB"] = str(root / "default.duckdb")
    from harness.zoo import ensure_built
    ensure_built("tiny_vision", SMALL_RECIPE)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def shipped_submissions_db(db: Path, names: list[str]) -> Path:
    """A results database holding the shipped submissions `names` (submissions/NAME.yaml), submitted through
    the CLI to the session's default suite."""
    from click.testing import CliRunner
    from harness.cli import main
    for name in names:
        res = CliRunner().invoke(main, ["submit", str(REPO / "submissions" / f"{name}.yaml"), "--db", str(db), "--quiet"])
        assert res.exit_code == 0, res.output
    return db


@pytest.fixture()
def write_yaml(tmp_path):
    def write(name: str, data) -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path
    return write


@pytest.fixture()
def private_env(tmp_path, monkeypatch):
    """A private suites dir, cache and DB under tmp_path for one test."""
    for name in ("suites", "cache", "submissions"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("FBH_SUBMISSIONS_DIR", str(tmp_path / "submissions"))
    monkeypatch.setenv("FBH_SUITES_DIR", str(tmp_path / "suites"))
    monkeypatch.setenv("FBH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBH_DB", str(tmp_path / "results.duckdb"))
    return tmp_path


def save_random_image_datasets(root: Path, tasks: dict[str, list[str]]) -> None:
    """Per task, a datasets-on-disk folder (train 8, test 12) of random 40x36 RGB images whose labels
    cycle through the class names: the on-disk layout of the real image suites."""
    import datasets
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for task, classes in tasks.items():
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})

        def split(n):
            images = [Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)) for _ in range(n)]
            return datasets.Dataset.from_dict({"image": images, "label": [i % len(classes) for i in range(n)]},
                                              features=features)
        datasets.DatasetDict({"train": split(8), "test": split(12)}).save_to_disk(str(root / "data" / task))
