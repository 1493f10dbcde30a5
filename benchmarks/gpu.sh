#!/usr/bin/env bash
# GPU readiness in one script (at most 8 minutes on one GPU): training throughput, bare forward/backward
# vs BadNets vs IMC (`python -m bdlab.bench train`), and Neural Cleanse batched vs sequential
# (`python -m bdlab.bench inspect`), with ResNet-18 on CIFAR-shaped synthetic data (3x32x32, 50k/10k).
# It is meant for a machine without network whose image has torch, torchvision, pytorch-lightning and
# torchmetrics only: what else the benchmarks import is installed from benchmarks/wheels, filled
# beforehand where there is network by `bash benchmarks/fetch_wheels.sh [--bench-only] <device python>`.
#   bash benchmarks/gpu.sh [--out DIR]      rows appended to DIR/train.md and DIR/inspect.md (default:
#                                           $OUT when set, as on a device machine, else benchmarks/)
#   bash benchmarks/gpu.sh --cpu-smoke      the same steps shrunk (16 px, 128 images, 1 epoch, 2 Neural
#                                           Cleanse epochs) on the CPU, rows in a temporary folder
# Each row names its device (CUDA's device name). Exit status 0 when every benchmark wrote its rows.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --out) out="${2:?--out needs a folder}"; shift ;;
    *) echo "usage: bash benchmarks/gpu.sh [--cpu-smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$out" ] || { [ $smoke = 1 ] && out="$(mktemp -d)"; } || out="${OUT:-benchmarks}"
mkdir -p "$out"
started=$SECONDS
budget=470  # seconds for everything, under the 8 minutes

# 1. what the image lacks, from the carried wheels: the benchmarks' imports first, then the rest of
#    pyproject.toml's dependencies, each when its wheel was fetched (fetch_wheels.sh --bench-only skips them)
missing() { for pair in "$@"; do python -c "import ${pair%%=*}" 2>/dev/null || echo "${pair#*=}"; done; }
install() { python -m pip install --quiet --no-index --find-links benchmarks/wheels "$@"; }
needed=$(missing hydra=hydra-core omegaconf=omegaconf safetensors=safetensors filelock=filelock scipy=scipy \
  matplotlib=matplotlib)
if [ -n "$needed" ]; then
  echo "gpu.sh: installing $(echo $needed) from benchmarks/wheels"
  install $needed || { echo "gpu.sh: benchmarks/wheels lacks wheels for $(python -V); run" \
    "'bash benchmarks/fetch_wheels.sh --bench-only <version>' where there is network" >&2; exit 2; }
fi
for package in $(missing wandb=wandb sklearn=scikit-learn captum=captum torchattacks=torchattacks \
  hydra_plugins.hydra_joblib_launcher=hydra-joblib-launcher \
  hydra_plugins.hydra_submitit_launcher=hydra-submitit-launcher); do
  install "$package" 2>/dev/null || echo "gpu.sh: $package not installed (no wheel); the benchmarks do not import it"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. the benchmarks
if [ $smoke = 1 ]; then
  export BDLAB_CACHE="$out/cache"
  data=(dataset=synthetic dataset.channels=3 dataset.size=16 dataset.train_size=128 dataset.test_size=400
        model=resnet18 model.net.width=8 trainer.accelerator=cpu)
  train=(--epochs 1 --repeats 1)
  imc=(attack.init=scratch attack.preprocess_images=32 attack.trigger_every=4)
  inspect=(trainer.max_epochs=1 defense.epochs=2 defense.optimisation_images=8 defense.evaluation_images=8)
else
  python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
    { echo "gpu.sh: no CUDA device visible; use --cpu-smoke to check the script on the CPU" >&2; exit 2; }
  data=(dataset=synthetic dataset.channels=3 dataset.size=32 dataset.train_size=50000 dataset.test_size=10000
        model=resnet18)
  train=(--epochs 1 --repeats 2)
  imc=()
  inspect=(trainer.max_epochs=5)
fi
failed=0
step() {  # step CAP_SECONDS ARGS...: one bench command, stopped at its cap or at the overall budget
  local cap=$1 left=$((budget - (SECONDS - started)))
  shift
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 10 ]; then echo "gpu.sh: no time left for bench $*" >&2; failed=1; return; fi
  echo "gpu.sh: bench $* (at most ${cap}s)"
  timeout "$cap" python -m bdlab.bench "$@" || { echo "gpu.sh: bench $1 failed or ran out of time" >&2; failed=1; }
}
step 120 train "${data[@]}" attack=badnets "${train[@]}" --out "$out/train.md"
step 150 train "${data[@]}" attack=imc "${imc[@]}" "${train[@]}" --out "$out/train.md"
step 200 inspect "${data[@]}" attack=badnets "${inspect[@]}" --out "$out/inspect.md"

# 3. every table has its rows, each naming a device
for table in train inspect; do
  grep -qE '^\| synthetic \| resnet18 \|.*\| [^| ][^|]* \|$' "$out/$table.md" 2>/dev/null ||
    { echo "gpu.sh: no $table rows in $out/$table.md" >&2; failed=1; }
done
echo "gpu.sh: rows in $out/train.md and $out/inspect.md ($((SECONDS - started))s)"
exit $failed
