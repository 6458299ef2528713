"""Suite and submission specs: YAML in, validated config objects out.

Every error names the file, the field and a fix; nothing downstream sees raw YAML.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import FbhError
from harness.metrics import DEFAULT_METRIC, MetricName

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
NAME_FIX = "use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"


# Caps on what a spec may ask for: generous for any real benchmark, finite so that a typo or a
# hostile file is refused at once instead of queueing work without end (README, "What specs may hold").
MAX_TASKS = 64
MAX_LIST = 256              # corruptions, published rows, metrics, columns, suites
MAX_CLASSES = 100_000
MAX_TEMPLATES = 1_000
MAX_PROMPTS = 1_000_000     # classes x templates of one task: each prompt is one text encoding
MAX_SPLITS = 16             # generalization splits: each is one more fusion (grid: one more search) per submission
MAX_TEXT = 4000             # descriptions; titles, labels and sources are shorter
MAX_GRID_VALUES = 64        # values of one grid key
MAX_GRID_KEYS = 8
MAX_GRID_POINTS = 256       # fusions a grid search may queue per setting: the product of its sizes
MAX_BUDGET_SECONDS = 7 * 24 * 3600


class Strict(BaseModel):
    # strict: no silent coercion ('7' or `on` is not an integer); no inf/nan in any float.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- suites

class ZooSpec(Strict):
    """Models and data the harness builds itself, offline and deterministically."""
    builder: str
    recipe: dict[str, Any] = Field(default_factory=dict)
    digest: str | None = Field(None, description="the content digest the built zoo is expected to have "
                                                 "(`fbh zoo build` prints it); a build that differs is "
                                                 "reported, never refused")
    built_with: dict[str, str] | None = Field(
        None, max_length=32, description="what the pinned build ran on (torch, python and the packages its "
                                         "BUILD_COMPLETE.json lists): a build with another digest names the "
                                         "versions that differ")

    @field_validator("digest")
    @classmethod
    def _digest_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(DIGEST_PATTERN, v):
            raise ValueError("a zoo digest is 'sha256:' and 64 lower-case hex digits, as `fbh zoo build` prints it")
        return v


class FamilySpec(Strict):
    kind: str = Field(description="model-family adapter, e.g. clip_vision")
    base: str = Field(description="pre-trained model: HuggingFace id, local path, or zoo://path")
    experts: dict[str, str] = Field(description="one fine-tuned model per task name")
    heads: str | None = Field(None, description="fixed classification heads (safetensors), if the family uses them")
    processor: str | None = Field(None, description="preprocessor location; defaults to base")
    zoo: ZooSpec | None = None
    revision: str | None = Field(None, description="hub revision pinned for every model ref")
    revisions: dict[str, str] = Field(default_factory=dict,
                                      description="hub revision (a commit) pinned per model id; overrides revision")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="opt in to loading non-safetensors checkpoints")


Metric = MetricName  # harness.metrics registers each one's direction, aggregation and display


class TaskSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    dataset: str = Field(description="HuggingFace dataset id, local path, or zoo://path")
    dataset_config: str | None = Field(None, description="dataset configuration name, e.g. GLUE's 'mrpc'")
    revision: str | None = Field(None, description="hub revision (a commit) of the dataset, checked when loaded")
    input_columns: list[str] | None = Field(None, max_length=MAX_LIST,
                                            description="text or image columns the family reads, in order")
    label_column: str = "label"
    split: str = "test"
    validation_split: str | None = "validation"
    train_split: str | None = "train"
    metric: Metric = Field(DEFAULT_METRIC, description="the primary metric: the one averages and rankings use")
    extra_metrics: list[Metric] = Field(default_factory=list, max_length=MAX_LIST,
                                        description="further metrics stored and shown per task, e.g. pixel accuracy")
    max_examples: int | None = Field(None, gt=0, le=10_000_000)
    classes: list[str] | None = Field(None, min_length=1, max_length=MAX_CLASSES)
    templates: list[str] | None = Field(None, min_length=1, max_length=MAX_TEMPLATES,
                                        description="prompt templates: CLIP '{c}' for the class name; "
                                                    "text-to-text '{column}' for dataset columns")

    @model_validator(mode="after")
    def _bounded_prompts(self) -> "TaskSpec":
        prompts = len(self.classes or []) * len(self.templates or [])
        if prompts > MAX_PROMPTS:
            raise ValueError(f"task '{self.name}' has {prompts} prompts ({len(self.classes)} classes x "
                             f"{len(self.templates)} templates); at most {MAX_PROMPTS} are allowed")
        return self

    @model_validator(mode="after")
    def _distinct_metrics(self) -> "TaskSpec":
        metrics = [self.metric, *self.extra_metrics]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"task '{self.name}' lists a metric twice in metric + extra_metrics: {metrics}")
        return self


class CorruptionSpec(Strict):
    name: Literal["motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter",
                  "contrast", "jpeg"]
    severity: int = Field(3, ge=1, le=5)
    tasks: list[str] | None = Field(None, max_length=MAX_TASKS,
                                    description="tasks whose test sets are corrupted; default all")


class GeneralizationSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    seen: list[str] = Field(min_length=1, max_length=MAX_TASKS)
    unseen: list[str] = Field(min_length=1, max_length=MAX_TASKS)
    source: str | None = None


class PublishedRow(Strict):
    label: str = Field(min_length=1, max_length=120)
    method: str | None = Field(None, max_length=64)
    source: str = Field(min_length=1, max_length=500,
                        description="where the numbers come from, e.g. 'FusionBench Table 3'")
    tolerance: float = Field(0.5, ge=0, le=100)
    split: str | None = Field(None, description="generalization split name, if the row is for one")
    condition: str = "clean"
    values: dict[str, float]
    extra_values: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="task -> {extra metric: value}, for tasks with extra_metrics")


class ReferencesSpec(Strict):
    computed: list[Literal["pretrained", "stl", "mtl"]] = Field(default_factory=lambda: ["pretrained", "stl"],
                                                                max_length=3)
    mtl: str | None = Field(None, description="multi-task model (required if 'mtl' is computed)")
    published: list[PublishedRow] = Field(default_factory=list, max_length=MAX_LIST)

    @field_validator("computed")
    @classmethod
    def _computed_once(cls, computed: list[str]) -> list[str]:
        if len(set(computed)) != len(computed):
            raise ValueError(f"{computed} lists a reference twice; each is computed once, list it once")
        return computed


class SuiteSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    title: str | None = Field(None, max_length=200)
    description: str = Field("", max_length=MAX_TEXT)
    default: bool = Field(False, description="run by `fbh submit` when no --suite is given")
    family: FamilySpec
    tasks: list[TaskSpec] = Field(min_length=1, max_length=MAX_TASKS)
    corruptions: list[CorruptionSpec] = Field(default_factory=list, max_length=MAX_LIST)
    generalization: list[GeneralizationSpec] = Field(default_factory=list, max_length=MAX_SPLITS)
    references: ReferencesSpec = Field(default_factory=ReferencesSpec)
    eval_batch_size: int = Field(256, ge=1, le=65536)
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the dtype every model of the suite is held, merged into and run in: checkpoints "
                               "are cast to it when loaded, merges accumulate in float32 and round to it; one "
                               "precision per suite keeps every row of its leaderboard comparable")
    fusion_budget_seconds: float | None = Field(
        None, gt=0, le=MAX_BUDGET_SECONDS,
        description="wall-clock seconds one run's fusion may take (for a CPU suite, on 2 cores); "
                    "a run over it fails, naming the time it took")

    @model_validator(mode="after")
    def _consistent(self) -> "SuiteSpec":
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate task names {dupes}; each task name must be unique")
        missing = [n for n in names if n not in self.family.experts]
        if missing:
            raise ValueError(f"tasks {missing} have no expert in family.experts; add one per task")
        extra = [n for n in self.family.experts if n not in names]
        if extra:
            raise ValueError(f"family.experts names {extra}, which are not tasks; remove them or add the tasks")
        for g in self.generalization:
            unknown = [n for n in g.seen + g.unseen if n not in names]
            if unknown:
                raise ValueError(f"generalization '{g.name}' names unknown tasks {unknown}")
            if set(g.seen) & set(g.unseen):
                raise ValueError(f"generalization '{g.name}': a task cannot be both seen and unseen")
        for c in self.corruptions:
            unknown = [n for n in (c.tasks or []) if n not in names]
            if unknown:
                raise ValueError(f"corruption '{c.name}' names unknown tasks {unknown}")
        models = {self.family.base, self.family.processor, self.family.heads, self.references.mtl,
                  *self.family.experts.values()}
        unpinned = sorted(set(self.family.revisions) - models)
        if unpinned:
            raise ValueError(f"family.revisions pins {unpinned}, which the suite does not use as a model")
        if "mtl" in self.references.computed and not self.references.mtl:
            raise ValueError("references.computed lists 'mtl' but references.mtl names no model")
        return self

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)


# ----------------------------------------------------------------------------- submissions

GridValue = list[Any]


class SubmissionSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    method: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=MAX_TEXT)
    authors: str = Field("", max_length=500)
    url: str | None = Field(None, max_length=500)
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, GridValue] = Field(default_factory=dict,
                                       description="values to select on the validation split")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    seeds: list[int] | None = Field(None, min_length=1, max_length=10,
                                    description="run once per seed; the leaderboard shows mean and std over them")
    suites: list[str] | None = Field(None, max_length=MAX_LIST)

    @field_validator("url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://", v):
            raise ValueError("url must start with http:// or https://")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_bounded(cls, grid: dict[str, GridValue]) -> dict[str, GridValue]:
        if len(grid) > MAX_GRID_KEYS:
            raise ValueError(f"the grid searches {len(grid)} hyperparameters; at most {MAX_GRID_KEYS} are allowed")
        points = 1
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid.{key} is empty; give at least one value")
            if len(values) > MAX_GRID_VALUES:
                raise ValueError(f"grid.{key} has {len(values)} values; at most {MAX_GRID_VALUES} are allowed")
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise ValueError(f"grid.{key} lists {repeated[0]!r} twice; each value is one fusion, list it once")
            points *= len(values)
        if points > MAX_GRID_POINTS:
            sizes = " x ".join(str(len(v)) for v in grid.values())
            raise ValueError(f"the grid has {points} points ({sizes}), each one fusion per setting; at most "
                             f"{MAX_GRID_POINTS} are allowed: search fewer values")
        return grid

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) != len(v) or any(not 0 <= s <= 2**31 - 1 for s in v)):
            raise ValueError("seeds must be distinct integers from 0 to 2**31 - 1")
        return v

    def run_seeds(self) -> list[int]:
        """The seeds the submission runs with: `seeds`, else its one `seed`."""
        return list(self.seeds) if self.seeds else [self.seed]

    @model_validator(mode="after")
    def _grid_disjoint(self) -> "SubmissionSpec":
        if self.seeds is not None and "seed" in self.model_fields_set:
            raise ValueError("give seed or seeds, not both")
        both = sorted(set(self.params) & set(self.grid))
        if both:
            raise ValueError(f"{both} appear in both params and grid; give each hyperparameter once")
        return self


# ----------------------------------------------------------------------------- loading

MAX_SPEC_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 100_000  # values in the document once every alias is expanded
# The only YAML types a spec holds: text, numbers, booleans, null, lists and mappings.
PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class SpecLoader(yaml.SafeLoader):
    """safe_load without what a spec never needs and an attacker uses: aliases that expand past
    MAX_NODES values (a 1 KB alias bomb expands to gigabytes once validated), deep nesting (a
    RecursionError), repeated keys (the last one silently wins), and tags beyond plain text,
    numbers, lists and mappings (!!binary, !!timestamp, !!set, !!python/...)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                                        self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        if node.tag not in PLAIN_TAGS:
            raise yaml.constructor.ConstructorError(None, None, f"the YAML tag {node.tag} is not allowed in specs; "
                                                    "quote the value to make it text", node.start_mark)
        return super().construct_object(node, deep)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def expanded_size(node, sizes: dict[int, int] | None = None) -> int:
    """How many values a YAML node stands for with its aliases expanded (shared nodes counted each time)."""
    sizes = {} if sizes is None else sizes
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a node that contains itself counts once, and construction then refuses it
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        sizes[id(node)] = 1 + sum(expanded_size(c, sizes) for c in children)
    return sizes[id(node)]


def load_spec_yaml(text: str):
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node) > MAX_NODES:
            raise yaml.constructor.ConstructorError(None, None, f"the document expands to more than {MAX_NODES} "
                                                    "values (YAML aliases repeat what they point to)", node.start_mark)
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FbhError("file not found", file=str(path), fix="check the path")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise FbhError(f"file is larger than {MAX_SPEC_BYTES} bytes", file=str(path),
                       fix="specs are small YAML files; keep data out of them")
    try:
        data = load_spec_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FbhError("file is not UTF-8 text", file=str(path), fix="save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FbhError(f"invalid YAML{at}: {problem}", file=str(path),
                       fix="fix the YAML syntax (indentation, quotes, colons)") from None
    if not isinstance(data, dict):
        raise FbhError("top level must be a mapping of fields", file=str(path),
                       fix="write 'name: ...' style fields at the top level") from None
    return data


def field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def validation_error(exc: ValidationError, file: str, what: str) -> FbhError:
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-after",))
    field = field_path(loc)
    msg = first["msg"].removeprefix("Value error, ")
    kind = first["type"]
    if kind == "extra_forbidden":
        fix = f"remove '{field}' or check its spelling against the {what} schema"
        msg = "unknown field"
    elif kind == "missing":
        fix = f"add the required field '{field}'"
        msg = "required field is missing"
    elif kind.startswith("string_pattern"):
        fix = NAME_FIX
    else:
        fix = f"correct the value of '{field}' (got {first.get('input')!r:.80})"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return FbhError(msg, file=file, field=field, fix=fix)


# Characters that change how the text around them is shown without being seen: bidirectional
# overrides and isolates (a label that reads "cba" but sorts and links as "abc"), zero-width spaces,
# and control characters other than tab and newline (ANSI escapes rewrite the terminal). The
# zero-width joiners U+200C/U+200D are kept: scripts such as Persian and emoji sequences need them.
INVISIBLE = re.compile("[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u061c\u180e\u200b\u200e\u200f"
                       "\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def strip_invisible(text: str) -> str:
    """Text as shown to people: without the characters of INVISIBLE (for rows stored before they were refused)."""
    return INVISIBLE.sub("", text)


def check_visible_text(data: Any, file: str, loc: tuple = ()) -> None:
    """Refuse INVISIBLE characters anywhere in a spec: in names, labels, titles and descriptions they
    would disguise what the site and the CLI show; nowhere else does a spec need them."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        for text in (key, value):
            found = INVISIBLE.search(text) if isinstance(text, str) else None
            if found:
                raise FbhError(f"text holds the invisible control character U+{ord(found.group()):04X}", file=file,
                               field=field_path(loc + (key,)), fix="delete it (bidirectional overrides, zero-width "
                                                                   "and control characters are not allowed in specs)")
        check_visible_text(value, file, loc + (key,))


def parse(model: type[BaseModel], data: dict[str, Any], file: str, what: str):
    check_visible_text(data, file)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, file, what) from None


MAX_INCLUDE_DEPTH = 8
MAX_INCLUDES = 1000  # files read through include: for one spec (a 20-task suite reads 20)


def with_includes(data: Any, file: Path, root: Path | None = None, loc: str = "", chain: tuple = (),
                  reads: list | None = None) -> Any:
    """`data` with every `include: FILE` (or a list of files) expanded, at any level: a mapping is the
    included files' mappings merged in order, then its own keys over them (mappings merge key by key,
    anything else is replaced), as lm-evaluation-harness's task `include:`. FILE is relative to the file
    that names it and must stay inside the top-level spec's folder (root)."""
    root = root or Path(file).resolve().parent
    reads = [] if reads is None else reads
    if isinstance(data, list):
        return [with_includes(v, file, root, f"{loc}[{i}]", chain, reads) for i, v in enumerate(data)]
    if not isinstance(data, dict):
        return data
    own = {k: with_includes(v, file, root, f"{loc}.{k}" if loc else str(k), chain, reads)
           for k, v in data.items() if k != "include"}
    if "include" not in data:
        return own
    field = f"{loc}.include" if loc else "include"
    names = data["include"] if isinstance(data["include"], list) else [data["include"]]
    merged: dict = {}
    for name in names:
        merged = _merged(merged, _included(name, Path(file), root, field, chain, reads))
    return _merged(merged, own)


def _included(name: Any, file: Path, root: Path, field: str, chain: tuple, reads: list) -> dict:
    if not isinstance(name, str) or not name:
        raise FbhError(f"include must name a file (got {name!r:.60})", file=str(file), field=field,
                       fix="write include: path/to/file.yaml, relative to this file")
    target = (file.resolve().parent / name).resolve()
    if not target.is_relative_to(root):
        raise FbhError(f"included file {name} is outside the suites folder {root}", file=str(file), field=field,
                       fix="keep included files inside the folder of the suite that includes them")
    if target in chain or len(chain) >= MAX_INCLUDE_DEPTH:
        what = "includes itself" if target in chain else f"nests includes deeper than {MAX_INCLUDE_DEPTH}"
        raise FbhError(f"{name} {what}", file=str(file), field=field, fix="remove the circular or deep include")
    if not target.is_file():
        raise FbhError(f"included file {name} not found (looked for {target})", file=str(file), field=field,
                       fix="restore the file, or copy the suite together with the files it includes")
    reads.append(target)
    if len(reads) > MAX_INCLUDES:
        raise FbhError(f"more than {MAX_INCLUDES} files included", file=str(file), field=field,
                       fix="include each shared file once per suite")
    return with_includes(read_yaml(target), target, root, "", (*chain, target), reads)


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def included_files(path: Path) -> list[Path]:
    """Every file a suite file includes, directly or not."""
    reads: list[Path] = []
    with_includes(read_yaml(path), Path(path), reads=reads)
    return reads


def read_suite_yaml(path: Path) -> dict[str, Any]:
    """A suite file's fields with its includes expanded (not yet validated)."""
    return with_includes(read_yaml(path), Path(path))


def load_suite(path: Path) -> SuiteSpec:
    suite = parse(SuiteSpec, read_suite_yaml(path), str(path), "suite")
    check_refs_stay_inside(suite, Path(path))
    check_published_rows(suite, Path(path))
    check_settings_are_distinct(suite, Path(path))
    check_conditions_are_distinct(suite, Path(path))
    return suite


def check_published_rows(suite: SuiteSpec, path: Path) -> None:
    """A published row is stored as it is, so it may only name the suite's tasks, their declared extra
    metrics, its generalization splits and its conditions: anything else would be a row no table shows."""
    names = set(suite.task_names)
    splits = {g.name for g in suite.generalization}
    conditions = {"clean"} | {c.name for c in suite.corruptions}
    for i, row in enumerate(suite.references.published):
        where = f"references.published[{i}]"
        problems = [("values", sorted(set(row.values) - names), "unknown tasks", "use the suite's task names"),
                    ("extra_values", sorted(set(row.extra_values) - names), "unknown tasks",
                     "use the suite's task names"),
                    ("extra_values", sorted(f"{t}:{m}" for t, by in row.extra_values.items() if t in names
                                            for m in by if m not in suite.task(t).extra_metrics),
                     "metrics its tasks do not declare in extra_metrics", "declare them, or remove them"),
                    ("split", [row.split] if row.split is not None and row.split not in splits else [],
                     "an unknown generalization split", f"use one of {sorted(splits)}, or drop split"),
                    ("condition", [row.condition] if row.condition not in conditions else [],
                     "an unknown condition", f"use one of {sorted(conditions)}")]
        for field, bad, what, fix in problems:
            if bad:
                raise FbhError(f"published row '{row.label}' names {what}: {bad}", file=str(path),
                               field=f"{where}.{field}", fix=fix)


def check_settings_are_distinct(suite: SuiteSpec, path: Path) -> None:
    """Every setting is stored and shown under its name, so a split may not be called 'all' (the setting
    of every task) nor share its name with another split."""
    first: dict[str, int] = {}
    for i, split in enumerate(suite.generalization):
        field = f"generalization[{i}].name"
        if split.name == "all":
            raise FbhError("a generalization split may not be named 'all': that is the setting fusing every task",
                           file=str(path), field=field, fix="rename the split, e.g. after its unseen tasks")
        if split.name in first:
            raise FbhError(f"generalization split '{split.name}' is named twice (also generalization"
                           f"[{first[split.name]}])", file=str(path), field=field,
                           fix="give each split its own name, or remove the repeated one")
        first[split.name] = i


def check_conditions_are_distinct(suite: SuiteSpec, path: Path) -> None:
    """A corruption may be listed at several severities, each once: results are told apart by
    (corruption, severity), so a repeated pair would score the same condition twice."""
    first: dict[tuple[str, int], int] = {}
    for i, c in enumerate(suite.corruptions):
        pair = (c.name, c.severity)
        if pair in first:
            raise FbhError(f"{c.name} at severity {c.severity} is listed twice (also corruptions[{first[pair]}])",
                           file=str(path), field=f"corruptions[{i}]",
                           fix="remove the repeat; to corrupt more tasks, add them to the first entry's tasks "
                               "(or drop its tasks to corrupt all)")
        first[pair] = i


def suite_refs(suite: SuiteSpec) -> list[tuple[str, str]]:
    """(field, reference) for every model, head and data reference in a suite."""
    fam = suite.family
    refs = [("family.base", fam.base), ("family.heads", fam.heads), ("family.processor", fam.processor),
            ("references.mtl", suite.references.mtl)]
    refs += [(f"family.experts.{t}", r) for t, r in fam.experts.items()]
    refs += [(f"tasks[{i}].dataset", t.dataset) for i, t in enumerate(suite.tasks)]
    return [(f, r) for f, r in refs if r]


def check_refs_stay_inside(suite: SuiteSpec, path: Path) -> None:
    """Relative paths may not climb out of the repository holding the suite, nor zoo:// refs out of the zoo."""
    root = path.resolve().parent.parent
    for field, ref in suite_refs(suite):
        rel = ref[len("zoo://"):] if ref.startswith("zoo://") else ref if ref.startswith(("./", "../")) else None
        if rel is None:
            continue
        if ref.startswith("zoo://"):
            escapes = Path(rel).is_absolute() or ".." in Path(rel).parts
        else:
            try:
                escapes = not (path.resolve().parent / rel).resolve().is_relative_to(root)
            except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
                raise FbhError(f"'{ref}' cannot be resolved ({getattr(exc, 'strerror', None) or exc})",
                               file=str(path), field=field, fix="check the path and its links") from None
        if escapes:
            raise FbhError(f"'{ref}' points outside the {'zoo' if ref.startswith('zoo://') else 'repository'}",
                           file=str(path), field=field,
                           fix="use a path inside the repository (or an absolute path you own), without '..'")


def load_submission(path: Path) -> SubmissionSpec:
    return parse(SubmissionSpec, read_yaml(path), str(path), "submission")
