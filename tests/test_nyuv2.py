"""ResNet-50 NYUv2 suite end to end on a tiny random ResNet: the real loading code (from_pretrained,
decoder.safetensors, datasets on disk), multi-metric rows, direction-aware leaderboard, converter."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import REPO
from harness.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SIZE, N, CLASSES = 32, 6, 13
OUT_CHANNELS = {"segmentation": CLASSES, "depth": 1, "normal": 3}
TASKS = {"segmentation": ("miou", ["pixel_accuracy"]), "depth": ("abs_err", ["rel_err"]),
         "normal": ("mean_angle", [])}




def tiny_config():
    from transformers import ResNetConfig
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="bottleneck")


def nyuv2_dataset(path) -> None:
    """The layout convert_dataset writes: image PNG, segmentation PNG (255 = unlabelled), depth and normals."""
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)

    def split(n):
        seg = rng.integers(0, CLASSES, (n, SIZE, SIZE)).astype(np.uint8)
        seg[:, :4] = 255
        depth = rng.uniform(0.5, 5, (n, SIZE, SIZE)).astype(np.float32)
        depth[:, -3:] = 0  # missing measurements
        normal = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
        normal[:, :, :2] = 0
        features = datasets.Features({"image": datasets.Image(), "segmentation": datasets.Image(),
                                      "depth": datasets.Array2D((SIZE, SIZE), "float32"),
                                      "normal": datasets.Array3D((SIZE, SIZE, 3), "float32")})
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)],
             "segmentation": [Image.fromarray(s) for s in seg], "depth": list(depth), "normal": list(normal)},
            features=features)
    datasets.DatasetDict({"train": split(4), "test": split(N)}).save_to_disk(str(path))


@pytest.fixture()
def nyuv2_env(tmp_path, private_env):
    from safetensors.torch import save_file
    from transformers import ResNetForImageClassification, ResNetModel
    from harness.families.resnet_nyuv2 import HEAD_FILE, deeplab_head
    torch.manual_seed(0)
    # a classification checkpoint: ResNetModel.from_pretrained reads the backbone out of one too
    ResNetForImageClassification(tiny_config()).save_pretrained(tmp_path / "resnet-50")
    base = ResNetModel.from_pretrained(tmp_path / "resnet-50")
    for i, (task, channels) in enumerate(OUT_CHANNELS.items()):
        expert = ResNetModel.from_pretrained(tmp_path / "resnet-50")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        expert.save_pretrained(tmp_path / "experts" / task)
        head = deeplab_head(16, 8, channels).eval()
        save_file(head.state_dict(), str(tmp_path / "experts" / task / HEAD_FILE))
    nyuv2_dataset(tmp_path / "data" / "nyuv2")
    spec = yaml.safe_load((REPO / "suites" / "resnet50-nyuv2.yaml").read_text())
    spec["family"]["base"] = "../resnet-50"
    spec["family"]["experts"] = {t: f"../experts/{t}" for t in OUT_CHANNELS}
    for t in spec["tasks"]:
        t["dataset"] = "../data/nyuv2"
    (tmp_path / "suites" / "resnet50-nyuv2.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path, base


def test_metrics_by_hand():
    from harness.families.resnet_nyuv2 import metric_of_sums, per_image_sums
    target = torch.tensor([[[0, 1], [1, 255]], [[2, 2], [0, 1]]], dtype=torch.uint8)
    perfect = per_image_sums("segmentation", target.clamp(max=2), target, 3).sum(0)
    assert metric_of_sums("miou", perfect) == 100 and metric_of_sums("pixel_accuracy", perfect) == 100
    pred = torch.tensor([[[0, 0], [1, 1]], [[2, 1], [0, 1]]], dtype=torch.uint8)
    sums = per_image_sums("segmentation", pred, target, 3).sum(0)
    # class 0: tp 2, fp 1 -> 2/3; class 1: tp 2, fn 1, fp 1 -> 2/4; class 2: tp 1, fn 1 -> 1/2
    assert metric_of_sums("miou", sums) == pytest.approx(100 * (2 / 3 + 2 / 4 + 1 / 2) / 3)
    assert metric_of_sums("pixel_accuracy", sums) == pytest.approx(100 * 5 / 7)
    depth_t = torch.tensor([[[[2.0, 0.0], [4.0, 1.0]]]])
    depth_p = torch.tensor([[[[3.0, 9.0], [4.0, 0.5]]]])
    sums = per_image_sums("depth", depth_p, depth_t).sum(0)  # the 0 target is ignored
    assert metric_of_sums("abs_err", sums) == pytest.approx(100 * 1.5 / 3)
    assert metric_of_sums("rel_err", sums) == pytest.approx(100 * (0.5 + 0 + 0.5) / 3)
    normal_t = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).view(1, 3, 1, 2)  # 2nd pixel: missing
    normal_p = torch.tensor([[2.0, 5.0], [2.0, 1.0], [0.0, 1.0]]).view(1, 3, 1, 2)  # unnormalised, 45 degrees
    assert metric_of_sums("mean_angle", per_image_sums("normal", normal_p, normal_t).sum(0)) == pytest.approx(45)


def test_dilated_backbone_matches_fusionbench_after_conversion(tmp_path):
    """FusionBench's own ResnetDilated + DeepLabHead, converted, give the family's outputs."""
    pytest.importorskip("fusion_bench")
    from fusion_bench.models.nyuv2 import resnet
    from fusion_bench.models.nyuv2.aspp import DeepLabHead
    from fusion_bench.models.nyuv2.resnet_dilated import ResnetDilated
    from transformers import ResNetConfig, ResNetModel
    from safetensors.torch import save_file
    from harness.families.resnet_nyuv2 import HEAD_FILE, convert_expert, dilate, head_from_state, split_fusionbench
    torch.manual_seed(0)
    torchvision_like = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1])
    encoder, decoder = ResnetDilated(torchvision_like).eval(), DeepLabHead(2048, 3).eval()
    for m in [*encoder.modules(), *decoder.modules()]:  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state |= {f"decoders.normal.{k}": v for k, v in decoder.state_dict().items()}
    backbone, head = split_fusionbench(state, "normal")
    ours = dilate(ResNetModel(ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                                           depths=[1, 1, 1, 1], layer_type="bottleneck"))).eval()
    ours.load_state_dict(backbone, strict=True)
    x = torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        expected = decoder(encoder(x))
        features = ours(pixel_values=x).last_hidden_state
        assert features.shape[-2:] == (4, 5)  # output stride 8
        assert torch.allclose(head_from_state(head)(features), expected, atol=1e-4)

    # The command-line converter writes the formats the family reads.
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "normal.safetensors"))
    convert_expert(tmp_path / "normal.safetensors", "normal", tmp_path / "normal", ours.config)
    loaded = dilate(ResNetModel.from_pretrained(tmp_path / "normal", use_safetensors=True)).eval()
    from safetensors.torch import load_file
    with torch.no_grad():
        again = head_from_state(load_file(str(tmp_path / "normal" / HEAD_FILE)))(loaded(pixel_values=x).last_hidden_state)
    assert torch.allclose(again, expected, atol=1e-4)


def test_suite_end_to_end(nyuv2_env):
    from harness.evaluate import Predictor
    from harness.families.resnet_nyuv2 import metric_of_sums, per_image_sums
    from harness.leaderboard import render, table
    from harness.runner import open_suite, submit
    root, base = nyuv2_env
    sub = root / "ta.yaml"
    sub.write_text(yaml.safe_dump({"name": "ta", "method": "task_arithmetic", "params": {"scaling_factor": 0.3}}))
    report = submit(sub, suites=["resnet50-nyuv2"], db=root / "results.duckdb", device="cpu",
                    progress=lambda m: None)
    assert [o.status for o in report.outcomes] == ["ok", "ok", "ok"], report.outcomes
    assert all(o.mean is None for o in report.outcomes)  # errors and scores are not averaged

    store = Store(root / "results.duckdb")
    runs = {r["label"]: r["run_id"] for r in store.query("SELECT label, run_id FROM runs WHERE kind != 'published'")}
    rows = {(r["task"], r["metric"]): r for r in store.query("SELECT * FROM results WHERE run_id = ?", [runs["STL"]])}
    assert set(rows) == {("segmentation", "miou"), ("segmentation", "pixel_accuracy"), ("depth", "abs_err"),
                         ("depth", "rel_err"), ("normal", "mean_angle")}
    for r in rows.values():
        assert r["n"] == N and r["ci_low"] <= r["value"] <= r["ci_high"]

    # The STL expert's stored values equal the metrics computed by hand on its own predictions.
    family = open_suite("resnet50-nyuv2", torch.device("cpu")).family
    inputs, targets = family.eval_data("depth", "test")
    assert inputs.dtype == torch.uint8 and inputs.shape == (N, 3, SIZE, SIZE) and targets.shape == (N, 1, SIZE, SIZE)
    model = family.build(family.expert_state("depth"))
    with torch.no_grad():
        depth = family.logits(model, "depth", inputs)
    valid = targets != 0
    err = (depth - targets).abs()[valid]
    assert rows[("depth", "abs_err")]["value"] == pytest.approx(100 * float(err.mean()), rel=1e-5)
    assert rows[("depth", "rel_err")]["value"] == pytest.approx(100 * float((err / targets[valid]).mean()), rel=1e-5)
    inputs, seg = family.eval_data("segmentation", "test")
    assert seg.shape == (N, SIZE, SIZE) and int(seg.max()) == 255
    stl_seg = family.predict(Predictor([family.build(family.expert_state("segmentation"))]), "segmentation",
                             inputs, 4)
    assert metric_of_sums("miou", per_image_sums("segmentation", seg, seg, CLASSES).sum(0)) == 100
    assert rows[("segmentation", "miou")]["value"] == pytest.approx(
        metric_of_sums("miou", per_image_sums("segmentation", stl_seg, seg, CLASSES).sum(0)))
    labelled = seg != 255
    assert rows[("segmentation", "pixel_accuracy")]["value"] == pytest.approx(
        100 * float((stl_seg == seg)[labelled].float().mean()))
    assert 0 <= rows[("normal", "mean_angle")]["value"] <= 180

    # Only the backbone is fused: the merged state is the base's shape, heads stay per task.
    assert set(family.expert_state("normal")) == set(base.state_dict())

    # Leaderboard: primary metrics as columns, extras beside, errors normalized as STL / score.
    tasks, entries = table(store, "resnet50-nyuv2")
    assert tasks == ["segmentation", "depth", "normal"]
    by = {e.label: e for e in entries}
    stl, ta = by["STL"], by["ta"]
    assert stl.normalized == pytest.approx(100) and stl.average is None
    expected = (ta.scores["segmentation"] / stl.scores["segmentation"] + stl.scores["depth"] / ta.scores["depth"]
                + stl.scores["normal"] / ta.scores["normal"]) / 3 * 100
    assert ta.normalized == pytest.approx(expected)
    assert ta.extra["metrics"]["depth"]["rel_err"] > 0
    assert by["Task Arithmetic (lambda=0.3)"].extra["metrics"]["segmentation"]["pixel_accuracy"] == 63.3
    assert by["Task Arithmetic (lambda=0.3)"].scores == {"segmentation": 33.6, "depth": 56.3, "normal": 31.3}
    text = render(tasks, entries, "text")
    assert "segmentation:pixel_accuracy" in text.splitlines()[0] and "depth:rel_err" in text.splitlines()[0]
    assert not any(math.isnan(e.normalized) for e in entries if e.normalized is not None)

    from harness.site import build
    build(store, root / "site")
    (board,) = (root / "site").rglob("resnet50-nyuv2*/leaderboard.csv")
    header = board.read_text().splitlines()[0]
    assert "segmentation pixel_accuracy" in header and "depth rel_err" in header
    # Scores and errors share the charts as % of STL; the Pareto y axis is the normalized score.
    from test_site import chart_data
    per_task = chart_data(board.parent / "index.html", "tasks")
    values = {s["label"]: s["values"] for s in per_task["series"]}
    assert "% of STL" in per_task["yTitle"] and values["STL"] == [100, 100, 100]
    assert sum(values["ta"]) / 3 == pytest.approx(ta.normalized, abs=1e-2)
    pareto = chart_data(board.parent / "index.html", "pareto")
    assert pareto["yTitle"] == "normalized score (% of STL)"
    (point,) = pareto["points"]
    assert point["label"] == "ta" and point["y"] == pytest.approx(ta.normalized, abs=1e-3)


def test_suite_unavailable_without_models(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from harness.cli import main
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("FBH_SUITES_DIR", str(tmp_path / "suites"))
    (tmp_path / "suites").mkdir()
    shutil.copy(REPO / "suites" / "resnet50-nyuv2.yaml", tmp_path / "suites")
    out = CliRunner().invoke(main, ["suites", "list"]).output
    line = next(line for line in out.splitlines() if line.startswith("resnet50-nyuv2"))
    assert "unavailable" in line.split() and "models/resnet50-nyuv2" in line
