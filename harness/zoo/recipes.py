"""Typed recipes: one strict schema per zoo builder, checked before any build starts.

A suite's `family.zoo.recipe` overrides its builder's DEFAULT_RECIPE. Without a schema, a wrong
value (`n_test: many`, `hidden_size: -1`, a million pre-training steps) reached the builder's
process as a traceback after minutes of work, or as work without end. Each field here has a type,
a range that is generous but finite (the caps of README, "What specs may hold"), and the builder's
default; unknown keys are refused. `tests/test_bad_input_catalogue.py` checks that each schema's
defaults equal its builder's DEFAULT_RECIPE, so the two cannot drift apart.

Torch-free: `fbh validate` and planning check recipes without importing a builder.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from harness.errors import FbhError
from harness.spec import field_path

RECIPE_FIELD = "family.zoo.recipe"
MAX_EXAMPLES = 100_000   # per task and split: the zoo is a CPU benchmark, not a dataset
MAX_STEPS = 100_000      # optimiser steps of one training phase
MAX_BATCH = 4096
TINY_VISION_TASKS = ("digits", "shapes", "textures", "colors", "counting", "position", "orientation", "svhn")
IMAGE_SIDE = 32          # tiny-vision's images; a patch must tile them


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class TinyVisionRecipe(Recipe):
    """harness/zoo/tiny_vision.py's knobs (its DEFAULT_RECIPE comments say what each does)."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    tasks: list[Literal[TINY_VISION_TASKS]] = Field(list(TINY_VISION_TASKS), min_length=1,
                                                    max_length=len(TINY_VISION_TASKS))
    n_train: int = Field(1000, ge=1, le=MAX_EXAMPLES)
    n_validation: int = Field(200, ge=1, le=MAX_EXAMPLES)
    n_test: int = Field(500, ge=1, le=MAX_EXAMPLES)
    hidden_size: int = Field(384, ge=8, le=2048)
    num_layers: int = Field(2, ge=1, le=24)
    num_heads: int = Field(6, ge=1, le=64)
    patch_size: int = Field(16, ge=1, le=IMAGE_SIDE)
    pretrain_steps: int = Field(300, ge=0, le=MAX_STEPS)
    pretrain_lr: float = Field(2e-3, gt=0, le=1)
    pretrain_batch: int = Field(64, ge=1, le=MAX_BATCH)
    pretrain_pool: int = Field(4096, ge=1, le=MAX_EXAMPLES)
    finetune_steps: int = Field(150, ge=0, le=MAX_STEPS)
    finetune_lr: float = Field(1e-4, gt=0, le=1)
    finetune_batch: int = Field(32, ge=1, le=MAX_BATCH)
    mtl_steps: int = Field(500, ge=0, le=MAX_STEPS)
    head_examples: int = Field(400, ge=1, le=MAX_EXAMPLES)
    head_shots: int = Field(8, ge=0, le=MAX_EXAMPLES)
    calibration_examples: int = Field(200, ge=1, le=MAX_EXAMPLES)
    projection: Literal["whiten", "none"] = "whiten"
    whiten_shrink: float = Field(0.05, ge=0, le=1)
    projection_dim: int = Field(0, ge=0, le=4096, description="keep the leading k whitened directions; 0 keeps all")
    logit_scale: Union[Literal["fit"], float] = Field("fit", description="'fit', or a fixed scale in (0, 1000]")
    weight_decay: float = Field(0.0, ge=0, le=10)

    @field_validator("tasks")
    @classmethod
    def _tasks_once(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"{tasks} lists a task twice; list each once")
        return tasks

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_width(cls, heads: int, info: ValidationInfo) -> int:
        width = info.data.get("hidden_size")
        if width is not None and width % heads:
            raise ValueError(f"hidden_size {width} is not a multiple of num_heads {heads}")
        return heads

    @field_validator("patch_size")
    @classmethod
    def _patch_tiles_image(cls, patch: int) -> int:
        if IMAGE_SIDE % patch:
            raise ValueError(f"patch_size {patch} does not tile the {IMAGE_SIDE}-pixel images; use a divisor of "
                             f"{IMAGE_SIDE}")
        return patch

    @field_validator("logit_scale", mode="before")
    @classmethod
    def _fit_or_scale(cls, value: Any) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value != "fit" and not (number and 0 < value <= 1000):
            raise ValueError(f"logit_scale is 'fit' or a number in (0, 1000], not {value!r}")
        return value


RECIPES: dict[str, type[Recipe]] = {"tiny_vision": TinyVisionRecipe}


def schema_defaults(builder: str) -> dict[str, Any]:
    return RECIPES[builder]().model_dump()


def check_recipe(builder: str, overrides: dict[str, Any]) -> None:
    """Raise FbhError naming `family.zoo.recipe.KEY` and the fix when overrides break the builder's schema."""
    try:
        RECIPES[builder].model_validate(overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        # A recipe is flat: its key, and the index for a list; deeper parts name pydantic's union branches.
        loc = tuple(first["loc"][:2] if len(first["loc"]) > 1 and isinstance(first["loc"][1], int)
                    else first["loc"][:1])
        field = f"{RECIPE_FIELD}.{field_path(loc)}" if loc else RECIPE_FIELD
        more = len(exc.errors()) - 1
        raise FbhError(first["msg"].removeprefix("Value error, ") + (f" (and {more} more)" if more else ""),
                       field=field, fix=f"correct {field} (got {first.get('input')!r:.80}); the builder's knobs, "
                                        f"types and ranges are in harness/zoo/recipes.py") from None
