"""The zoo builder's own process: `python -m harness.zoo.child BUILDER STAGING RESULT RECIPE_JSON`.

`harness.zoo.ensure_built` starts it with the pinned environment (`harness.zoo.build_pins`), so
ATen, MKL and oneDNN read those settings when torch is first imported here. Progress goes to
stdout, one line per message; the builder's report and what the build ran with (or the error's
last line) go to RESULT as JSON. A traceback goes to stderr, which the caller's terminal shows.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback
from importlib import metadata
from pathlib import Path

PACKAGES = ("numpy", "transformers", "datasets", "safetensors", "scikit-learn", "pillow")


def say(message: str) -> None:
    print(message, flush=True)


def build(name: str, staging: Path, recipe: dict) -> dict:
    import torch
    torch.set_num_threads(1)  # the builder sets it too; here it also holds for whatever runs before it
    from harness.zoo import builder_module
    report = builder_module(name).build(staging, recipe, say)
    return {"report": report, "torch": torch.__version__,
            "aten_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "packages": {p: metadata.version(p) for p in PACKAGES}}


def last_error_line(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def main(argv: list[str]) -> int:
    name, staging, result_file, recipe = argv
    try:
        result, status = build(name, Path(staging), json.loads(recipe)), 0
    except BaseException as exc:  # noqa: BLE001  the caller needs the reason whatever it was
        traceback.print_exc()
        result, status = {"error": last_error_line(exc)}, 1
    tmp = f"{result_file}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, result_file)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
