"""Print the requirements of the OpenCLIP environment, read from pyproject.toml so the lists stay
one: fbh's dependencies with torch swapped for the build torchvision 0.29.1 was made for (no
torchvision imports beside the base pin, torch 2.13 CPU), the openclip extra, and the test extra's
pytest and fusion-bench pins (tests/test_eval_parity_openclip.py runs fusion-bench's OpenCLIP task pool;
fusion-bench 0.2.33 installs beside torch 2.14.1 and leaves it there).
Use: pip install -r <(python3 .ci/openclip_requirements.py) && pip install --no-deps -e ."""

import tomllib
from pathlib import Path

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
base = [d for d in project["dependencies"] if not d.startswith("torch")]
openclip = [d for d in extras["openclip"] if not d.startswith("torch")]
test = [d for d in extras["test"] if d.startswith(("pytest", "fusion-bench"))]
print("\n".join(TORCH + base + openclip + test))
