"""ResNet-50 on NYUv2 scene understanding (FusionBench's dense-prediction setting).

Three tasks, 13-class segmentation, depth and surface normals, each with its own fine-tuned
ResNet-50. As in FusionBench (Figure 6), only the backbones are fused; every task keeps its own
decoder. The architecture is FusionBench's: a ResNet-50 dilated to output stride 8
(`ResnetDilated(dilate_scale=8)`: the strides of the last two stages become dilations 2 and 4),
a DeepLab ASPP head per task, its output upsampled bilinearly (align_corners) to the input size.
The backbone is transformers' `ResNetModel` (torchvision is not a dependency), loaded through
`from_pretrained`; an expert is a `save_pretrained` folder of its backbone with the task's head
beside it as `decoder.safetensors` (keys of FusionBench's `DeepLabHead`).
`python -m harness.families.resnet_nyuv2` converts torchvision's ResNet-50 (FusionBench's
pre-trained model), FusionBench's experts (torchvision key names) and its preprocessed NYUv2
arrays into these formats.

Inputs are images scaled to [0, 1] without mean/std normalisation, as FusionBench's NYUv2
loader gives them. Metrics follow fusion_bench.metrics.nyuv2, pooled over every valid pixel
of the split: mIoU and pixel accuracy (%), depth absolute and relative error (x100, the
paper's Table 4 units), mean angular error of the normals (degrees). Each is a function of a
sample of images, so its bootstrap CI resamples images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from harness.errors import FbhError, SuiteUnavailable
from harness.identity import revision_for
from harness.predictor import combine
from harness.families.common import HUB_FIX, FamilyBase, load_cached, load_pretrained, load_split
from harness.spec import SuiteSpec
from harness.tensors import StateDict

HEAD_FILE = "decoder.safetensors"
ATROUS_RATES = (12, 24, 36)  # FusionBench's DeepLabHead(ASPP(in_channels, [12, 24, 36]))
IGNORE_LABEL = 255           # segmentation pixels without a class (FusionBench's raw arrays use -1)
SEGMENTATION, DEPTH, NORMAL = "segmentation", "depth", "normal"
KIND_OF_METRIC = {"miou": SEGMENTATION, "pixel_accuracy": SEGMENTATION, "abs_err": DEPTH, "rel_err": DEPTH,
                  "mean_angle": NORMAL}


# ----------------------------------------------------------------------------- architecture

def dilate(model: nn.Module) -> nn.Module:
    """FusionBench's ResnetDilated(dilate_scale=8) applied to a transformers ResNetModel: in
    stages 3 and 4, stride-2 convolutions keep stride 1 and 3x3 convolutions dilate instead."""
    for stage, rate in zip(model.encoder.stages[2:4], (2, 4)):
        for conv in (m for m in stage.modules() if isinstance(m, nn.Conv2d)):
            if conv.stride == (2, 2):
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation = conv.padding = (rate // 2, rate // 2)
            elif conv.kernel_size == (3, 3):
                conv.dilation = conv.padding = (rate, rate)
    return model


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=dilation if kernel == 3 else 0, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class AsppPooling(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class Aspp(nn.Module):
    def __init__(self, cin: int, width: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(*conv_bn_relu(cin, width)),
                                    *[nn.Sequential(*conv_bn_relu(cin, width, 3, r)) for r in ATROUS_RATES],
                                    AsppPooling(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, width))])
        self.project = nn.Sequential(*conv_bn_relu(5 * width, width), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def deeplab_head(cin: int, width: int, cout: int) -> nn.Sequential:
    """FusionBench's DeepLabHead (models/nyuv2/aspp.py), same module names, with the width
    (256 there) read from the checkpoint so that small heads load too."""
    return nn.Sequential(Aspp(cin, width), *conv_bn_relu(width, width, 3), nn.Conv2d(width, cout, 1))


def head_from_state(state: dict[str, Tensor]) -> nn.Sequential:
    width, cin = state["0.convs.0.0.weight"].shape[:2]
    head = deeplab_head(cin, width, state["4.weight"].shape[0])
    head.load_state_dict(state, strict=True)
    return head.eval()


# ----------------------------------------------------------------------------- metrics

def per_image_sums(kind: str, outputs: Tensor, targets: Tensor, num_classes: int = 0, chunk: int = 32) -> Tensor:
    """Per image, the sums every metric of its task is a ratio of, [N, ...] float64; computed a
    chunk of images at a time, so a full test split never needs float64 copies of all its pixels."""
    return torch.cat([_sums(kind, outputs[i:i + chunk], targets[i:i + chunk], num_classes)
                      for i in range(0, len(outputs), chunk)])


def _sums(kind: str, outputs: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    if kind == SEGMENTATION:
        t, p = targets.long().flatten(1), outputs.long().flatten(1)
        cells = torch.where(t < num_classes, t * num_classes + p, num_classes ** 2)  # unlabelled -> spill bin
        counts = torch.zeros(len(t), num_classes ** 2 + 1, dtype=torch.float64)
        counts.scatter_add_(1, cells, torch.ones_like(cells, dtype=torch.float64))
        return counts[:, :-1].view(-1, num_classes, num_classes)  # [N, true, predicted]
    valid = targets.sum(dim=1) != 0  # FusionBench: an all-zero depth or normal marks a missing measurement
    if kind == DEPTH:
        t, p = targets[:, 0].double(), outputs[:, 0].double()
        err = (p - t).abs() * valid
        rel = err / torch.where(valid, t, 1.0)
        return torch.stack([err.flatten(1).sum(1), rel.flatten(1).sum(1), valid.flatten(1).sum(1)], dim=1)
    cos = (F.normalize(outputs.double(), dim=1) * targets.double()).sum(dim=1).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos)) * valid
    return torch.stack([angle.flatten(1).sum(1), valid.flatten(1).sum(1)], dim=1)


def metric_of_sums(metric: str, sums: Tensor) -> float:
    """One metric from per-image sums summed over a sample of images."""
    if metric in ("miou", "pixel_accuracy"):
        diag = sums.diagonal()
        if metric == "pixel_accuracy":
            return 100 * float(diag.sum() / sums.sum())
        union = sums.sum(0) + sums.sum(1) - diag
        # Classes absent from both truth and prediction have no IoU; FusionBench's plain mean would
        # be NaN there. On the full NYUv2 test set every class occurs, so the two agree.
        return 100 * float((diag[union > 0] / union[union > 0]).mean())
    if metric in ("abs_err", "rel_err"):
        return 100 * float(sums[0 if metric == "abs_err" else 1] / sums[2])
    return float(sums[0] / sums[1])


# ----------------------------------------------------------------------------- family

class ResnetNyuv2Family(FamilyBase):
    MODEL_MODULES = ("transformers.models.resnet.modeling_resnet",)
    HEAD_STATE = ("_heads",)

    def __init__(self, suite: SuiteSpec, suite_file: Path, zoo_dir: Path | None, device: torch.device):
        super().__init__(suite, suite_file, zoo_dir, device)
        self._heads: dict[str, nn.Module] = {}
        for i, task in enumerate(suite.tasks):
            if task.metric not in KIND_OF_METRIC:
                raise FbhError(f"task '{task.name}' has metric '{task.metric}', not a NYUv2 metric",
                               file=str(suite_file), field=f"tasks[{i}].metric",
                               fix=f"use one of {sorted(KIND_OF_METRIC)}")

    # -- models ------------------------------------------------------------------
    def load_model(self, ref: str, field: str) -> nn.Module:
        from transformers import ResNetModel
        # ResNetModel also loads the backbone of a ResNetForImageClassification (microsoft/resnet-50).
        return dilate(load_pretrained(ResNetModel.from_pretrained, self.suite, self.suite_file, self.resolve,
                                      ref, field).eval())

    def base_state(self) -> StateDict:
        return self.held(self.template(), copy=True)

    def load_state(self, ref: str, field: str) -> StateDict:
        return self.held(self.load_model(ref, field))

    def expert_state(self, task: str) -> StateDict:
        return self.load_state(self.suite.family.experts[task], f"family.experts.{task}")

    # -- heads -------------------------------------------------------------------
    def _head_file(self, task: str) -> str:
        ref, field = self.suite.family.experts[task], f"family.experts.{task}"
        resolved = self.resolve(ref, field)
        if Path(resolved).exists():
            path = Path(resolved) / HEAD_FILE
            if not path.is_file():
                raise SuiteUnavailable(f"expert '{ref}' has no {HEAD_FILE} (the task's decoder)",
                                       file=str(self.suite_file), field=field,
                                       fix="save the task head beside the backbone (see README, NYUv2)")
            return str(path)
        from huggingface_hub import hf_hub_download
        try:
            return hf_hub_download(resolved, HEAD_FILE, revision=revision_for(self.suite, ref))
        except Exception as exc:  # offline, missing repo or file: the suite cannot run here
            raise SuiteUnavailable(f"cannot load the {task} decoder of '{ref}': {str(exc).splitlines()[0]}",
                                   file=str(self.suite_file), field=field, fix=HUB_FIX) from None

    def head(self, task: str) -> nn.Module:
        if task not in self._heads:
            self._heads[task] = head_from_state(load_file(self._head_file(task))).to(self.device)
        return self._heads[task]

    def kind(self, task: str) -> str:
        return KIND_OF_METRIC[self.suite.task(task).metric]

    def logits(self, model: nn.Module, task: str, inputs: Tensor) -> Tensor:
        """The task's dense output at input resolution: class logits, depth, or unnormalised normals."""
        x = inputs.to(self.device, next(model.parameters()).dtype) / 255  # cached as uint8
        features = model(pixel_values=x).last_hidden_state
        out = self.head(task)(features.float())
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def predict(self, predictor, task: str, inputs: Tensor, batch_size: int) -> Tensor:
        """Members' outputs combined per batch, then reduced to what the metrics read (class
        maps, not [N, 13, H, W] logits), so a split's predictions stay small."""
        outs = []
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size]
            out = combine(predictor, torch.stack([self.logits(m, task, x).float() for m in predictor.members]))
            outs.append(out.argmax(dim=1).to(torch.uint8).cpu() if self.kind(task) == SEGMENTATION else out.cpu())
        return torch.cat(outs)

    # -- data --------------------------------------------------------------------
    def eval_data(self, task: str, split: str, corruption: str | None = None,
                  severity: int | None = None) -> tuple[Tensor, Tensor]:
        if corruption is not None:
            raise FbhError("the NYUv2 family does not apply corruptions", file=str(self.suite_file),
                           field="corruptions", fix="remove corruptions from this suite")
        ds = load_split(self.suite, self.suite_file, self.resolve, task, split)
        spec = self.suite.task(task)
        image_column = (spec.input_columns or ["image"])[0]

        def build() -> dict[str, Tensor]:
            ds_np = ds.with_format("numpy", columns=[spec.label_column])
            images = np.stack([np.asarray(im.convert("RGB")) for im in ds[image_column]])
            target = torch.from_numpy(np.stack(list(ds_np[spec.label_column])))
            if self.kind(task) == SEGMENTATION:
                target = target.to(torch.uint8)
            else:  # depth [N, H, W] or normals [N, H, W, 3] -> channels first
                target = (target[:, None] if target.dim() == 3 else target.permute(0, 3, 1, 2)).float()
            return {"inputs": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), "targets": target}

        key = self.evalset_key(task, split, ds, image_column=image_column, kind=self.kind(task))
        t = load_cached("evalsets", f"{task}-{split}", key, build)
        return t["inputs"], t["targets"]

    def num_classes(self, task: str) -> int:
        return self.head(task)[-1].out_channels

    def metric_statistic(self, task: str, metric: str, outputs: Tensor, targets: Tensor):
        kind = KIND_OF_METRIC.get(metric)
        if kind != self.kind(task):
            fits = sorted(m for m, k in KIND_OF_METRIC.items() if k == self.kind(task))
            raise FbhError(f"metric '{metric}' does not apply to a {self.kind(task)} task", file=str(self.suite_file),
                           field=f"tasks[{task}]", fix=f"use one of {fits}")
        sums = per_image_sums(kind, outputs, targets, self.num_classes(task) if kind == SEGMENTATION else 0)
        return lambda idx: metric_of_sums(metric, sums[idx].sum(0))

    def statistic(self, task: str, outputs: Tensor, targets: Tensor):
        return self.metric_statistic(task, self.suite.task(task).metric, outputs, targets)

    def score(self, task: str, outputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError("NYUv2 metrics are pooled over pixels; see statistic()")


# ----------------------------------------------------------------------------- converters

def from_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision-named ResNet state dict (FusionBench's encoder) -> transformers ResNetModel keys.
    The classifier (fc.*) is dropped; any other unknown key is an error."""
    def rename(key: str) -> str | None:
        parts = key.split(".")
        if parts[0] == "fc":
            return None
        if parts[0] in ("conv1", "bn1"):
            return "embedder.embedder." + ("convolution" if parts[0] == "conv1" else "normalization") \
                + "." + parts[1]
        if parts[0].startswith("layer"):
            stage, block, module, rest = int(parts[0][5:]) - 1, parts[1], parts[2], parts[3:]
            prefix = f"encoder.stages.{stage}.layers.{block}."
            if module == "downsample":
                return prefix + "shortcut." + ("convolution" if rest[0] == "0" else "normalization") + "." + rest[1]
            if module[:-1] in ("conv", "bn"):
                return (prefix + f"layer.{int(module[-1]) - 1}."
                        + ("convolution" if module.startswith("conv") else "normalization") + "." + rest[0])
        raise KeyError(f"'{key}' is not a torchvision ResNet entry")
    return {new: v for k, v in state.items() if (new := rename(k)) is not None}


def split_fusionbench(state: dict[str, Tensor], task: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A FusionBench NYUv2Model state dict ('encoder.*', 'decoders.<task>.*'; a Lightning checkpoint's
    'state_dict') -> (ResNetModel backbone state, the task's head state)."""
    backbone = from_torchvision({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    prefix = f"decoders.{task}."
    head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not head:
        raise KeyError(f"the checkpoint has no '{prefix}*' entries")
    return backbone, head


def convert_backbone(state: dict[str, Tensor], out: Path, config=None) -> None:
    """A torchvision-named ResNet state dict -> a save_pretrained ResNetModel folder
    (config: a transformers ResNetConfig; its defaults are ResNet-50's)."""
    from transformers import ResNetConfig, ResNetModel
    model = ResNetModel(config or ResNetConfig())
    model.load_state_dict(from_torchvision(state), strict=True)
    model.save_pretrained(out)


def convert_expert(checkpoint: Path, task: str, out: Path, config=None) -> None:
    """FusionBench's expert, its state dict saved as safetensors, -> a save_pretrained backbone folder
    with decoder.safetensors beside it. Lightning's .ckpt is a pickle, which fbh never unpickles:
    re-save it first with torch's weights_only loader (README, NYUv2)."""
    state = load_file(str(checkpoint))
    _, head = split_fusionbench(state, task)
    convert_backbone({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}, out, config)
    save_file({k: v.contiguous() for k, v in head.items()}, str(Path(out) / HEAD_FILE))


def convert_dataset(root: Path, out: Path) -> None:
    """FusionBench's preprocessed NYUv2 (root/{train,val}/{image,label,depth,normal}/N.npy, from
    auto-lambda) -> a DatasetDict on disk with splits train and test (FusionBench tests on val)."""
    import datasets
    from PIL import Image

    def split(folder: Path) -> datasets.Dataset:
        n = len(list((folder / "image").glob("*.npy")))
        first = np.load(folder / "image" / "0.npy")
        h, w = first.shape[:2]
        features = datasets.Features({"image": datasets.Image(), "segmentation": datasets.Image(),
                                      "depth": datasets.Array2D((h, w), "float32"),
                                      "normal": datasets.Array3D((h, w, 3), "float32")})

        def rows():
            for i in range(n):
                image = np.load(folder / "image" / f"{i}.npy")
                label = np.load(folder / "label" / f"{i}.npy")
                yield {"image": Image.fromarray(np.round(image * 255).clip(0, 255).astype(np.uint8)),
                       "segmentation": Image.fromarray(np.where(label < 0, IGNORE_LABEL, label).astype(np.uint8)),
                       "depth": np.load(folder / "depth" / f"{i}.npy")[..., 0].astype(np.float32),
                       "normal": np.load(folder / "normal" / f"{i}.npy").astype(np.float32)}
        return datasets.Dataset.from_generator(rows, features=features)

    datasets.DatasetDict({"train": split(root / "train"), "test": split(root / "val")}).save_to_disk(str(out))


if __name__ == "__main__":
    usage = ("python -m harness.families.resnet_nyuv2 base TORCHVISION_RESNET50.safetensors OUT_DIR\n"
             "python -m harness.families.resnet_nyuv2 expert CKPT_STATE_DICT.safetensors TASK OUT_DIR\n"
             "python -m harness.families.resnet_nyuv2 dataset NYUV2_NPY_ROOT OUT_DIR")
    args = sys.argv[1:]
    if args[:1] == ["base"] and len(args) == 3:
        convert_backbone(load_file(args[1]), Path(args[2]))
    elif args[:1] == ["expert"] and len(args) == 4:
        convert_expert(Path(args[1]), args[2], Path(args[3]))
    elif args[:1] == ["dataset"] and len(args) == 3:
        convert_dataset(Path(args[1]), Path(args[2]))
    else:
        sys.exit(usage)
