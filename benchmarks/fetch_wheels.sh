#!/usr/bin/env bash
# Fill benchmarks/wheels (gitignored) with what benchmarks/gpu.sh installs on a machine without network
# whose image has torch, torchvision, pytorch-lightning and torchmetrics but nothing else of pyproject.toml:
#   bash benchmarks/fetch_wheels.sh [--bench-only] [PYTHON_VERSION ...]      (default: 3.11)
# Run it with the project's virtual environment active: the packages and versions are the ones that venv
# resolved for pyproject.toml's runtime dependencies (so they are known to work together), less the
# device image's torch stack and its own dependencies. Each is fetched without dependencies (they are in
# the list) as a CPython PYTHON_VERSION manylinux x86_64 wheel; pure-Python ones serve every version, and a
# package published only as a source archive (antlr4-python3-runtime 4.9.3) is built into a wheel here.
# --bench-only: what `python -m bdlab.bench` imports (hydra, scipy, matplotlib, safetensors, filelock and
# their dependencies): ~50 MB for one Python version, under the 64 MiB a device session may carry, where
# every dependency (wandb, scikit-learn, captum, ...) is ~100 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
roots="pyproject"
versions=()
for arg in "$@"; do
  case "$arg" in
    --bench-only) roots="hydra-core omegaconf safetensors filelock scipy matplotlib" ;;
    [0-9].[0-9]*) versions+=("$arg") ;;
    *) echo "usage: bash benchmarks/fetch_wheels.sh [--bench-only] [PYTHON_VERSION ...]" >&2; exit 2 ;;
  esac
done
[ ${#versions[@]} -gt 0 ] || versions=(3.11)
dest=benchmarks/wheels
mkdir -p "$dest"

# name==version for each package the device lacks, from the active environment's metadata
mapfile -t pins < <(ROOTS="$roots" python - <<'PY'
import importlib.metadata as metadata, os, tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

def closure(roots):
    found, stack = {}, [canonicalize_name(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: activate the project's venv (pip install -e .)")
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                stack.append(canonicalize_name(requirement.name))
    return found

roots = os.environ["ROOTS"].split()
if roots == ["pyproject"]:
    roots = [Requirement(r).name for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
image = closure(["torch", "torchvision", "pytorch-lightning", "torchmetrics"])
for name, version in sorted(closure(roots).items()):
    if name not in image:
        print(f"{name}=={version}")
PY
)
echo "fetch_wheels: ${#pins[@]} packages for Python ${versions[*]} into $dest"
for version in "${versions[@]}"; do
  for pin in "${pins[@]}"; do
    pip download --quiet --no-deps --only-binary=:all: --dest "$dest" --python-version "$version" \
      --implementation cp --abi "cp${version/./}" --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$pin" 2>/dev/null ||
      pip wheel --quiet --no-deps --wheel-dir "$dest" "$pin"  # source only: pure Python, built here
  done
done
du -sh "$dest"
