#!/usr/bin/env bash
# The GPU check in one device call: carried wheels, what the machine has, then `python -m benchmarks.gpu_check`.
# No network: the models are random-init from configs, the tokenizer and the data are lora-rm's built-in ones.
# Every step has its own timeout (60 + 15 + 30 + 270 = 375 s at most, inside the device's 600 s per command).
# Results in $OUT (else benchmarks/results/gpu): gpu_check.md, gpu_check.json, gpu_run.log.
# How to call it, and which wheels to carry: benchmarks/README.md, "GPU".
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# 1. packages the machine lacks, carried as wheels in .whl/: datasets with dill and multiprocess (import lora_rm
#    needs them) and bitsandbytes (the nf4 rows)
if compgen -G ".whl/*.whl" >/dev/null; then
  timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# 2. the card and the versions, for the table's header and the README
timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
timeout 30 python3 - >>"$LOG" 2>&1 <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "datasets"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # a missing one is a skipped or failing section, not a stop
        print(name, "missing:", error)
PY

# 3. the check: --budget 235 s inside, 270 s hard here
# GPU_CHECK_ARGS: extra flags, e.g. --smoke or --sections "overhead bf16" "layer profile" (a rerun)
eval "set -- ${GPU_CHECK_ARGS:-}"
timeout 270 python3 -m benchmarks.gpu_check --out "$OUT" "$@" 2>&1 | tee -a "$LOG"
