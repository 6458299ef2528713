"""Nothing from a config is executed; checkpoints load from safetensors unless a suite opts in."""

import ast
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

SOURCES = sorted((REPO / "harness").rglob("*.py")) + sorted((REPO / "methods").glob("*.py"))


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            yield node, (f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None)


# The only pickles fbh loads pass between the driver and the fusion process it started
# (harness.isolation): the fusion process reads the method and the family's kit the driver wrote
# before any method code runs; the driver reads back a method's own module, which is that method's
# code running as it always did, and is recorded as data access not verified (`fbh ci --evaluate`
# never loads it). No file a user or a suite points at is unpickled.
PICKLES_BETWEEN_OWN_PROCESSES = {("harness/fusion_worker.py", "torch"), ("harness/fusion_worker.py", "pickle"),
                                 ("harness/isolation.py", "torch")}


def test_no_eval_exec_or_pickle_loading_in_the_code():
    for path in SOURCES:
        for node, name in calls(path):
            builtin = isinstance(node.func, ast.Name)  # model.eval() is fine; eval(...) is not
            assert not (builtin and name in {"eval", "exec", "compile", "__import__"}), f"{path}:{node.lineno}"
            if name == "load" and isinstance(node.func, ast.Attribute):
                owner = getattr(node.func.value, "id", "")
                if (path.relative_to(REPO).as_posix(), owner) in PICKLES_BETWEEN_OWN_PROCESSES:
                    continue
                assert owner not in {"torch", "pickle", "yaml"}, f"{path}:{node.lineno} calls {owner}.load"


def test_every_from_pretrained_states_its_remote_code_and_pickle_policy():
    for path in (REPO / "harness").rglob("*.py"):
        for node, name in calls(path):
            owner = ast.unparse(node.func)
            # processors, tokenizers and configs read JSON/text only; weights are what can carry pickles
            # PeftModel adapters are checked for adapter_model.safetensors before loading (flan_t5.py)
            if name == "from_pretrained" and not any(w in owner for w in ("Processor", "Tokenizer", "Config",
                                                                          "PeftModel")):
                kwargs = {k.arg for k in node.keywords}
                assert {"trust_remote_code", "use_safetensors"} <= kwargs, f"{path}:{node.lineno}"


@pytest.fixture()
def pickled_suite(tmp_path, fbh_env):
    """A suite whose expert is saved as a pickle (pytorch_model.bin) instead of safetensors."""
    from harness.zoo import zoo_path
    from conftest import SMALL_RECIPE, small_suite_spec
    from transformers import CLIPVisionModel
    zoo = zoo_path("tiny_vision", SMALL_RECIPE)
    expert = CLIPVisionModel.from_pretrained(zoo / "experts" / "digits")
    expert.config.save_pretrained(tmp_path / "pickled")  # transformers 5 writes only safetensors itself
    torch.save(expert.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    spec = small_suite_spec("tiny-pickle")
    spec["family"]["experts"]["digits"] = str(tmp_path / "pickled")
    path = tmp_path / "suites" / "tiny-pickle.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def test_pickle_checkpoint_refused_unless_suite_opts_in(pickled_suite):
    from harness.errors import SuiteUnavailable
    from harness.families import load_family
    from harness.spec import load_suite
    from harness.zoo import ensure_built
    path, spec = pickled_suite
    suite = load_suite(path)
    zoo = ensure_built("tiny_vision", suite.family.zoo.recipe)
    family = load_family(suite, path, zoo, torch.device("cpu"))
    with pytest.raises(SuiteUnavailable) as exc:
        family.expert_state("digits")
    assert exc.value.field == "family.experts.digits"
    spec["family"]["allow_pickle"] = True
    path.write_text(yaml.safe_dump(spec))
    opted_in = load_family(load_suite(path), path, zoo, torch.device("cpu"))
    assert set(opted_in.expert_state("digits")) == set(opted_in.base_state())
