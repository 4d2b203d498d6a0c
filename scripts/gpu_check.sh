#!/usr/bin/env bash
# The device check: rlrun's GPU path in one go on a lent GPU (one H100 / H200, no network).
#
#   scripts/gpu_check.sh                        # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh   # the same pipeline on the CPU: small, short, no GPU
#
# 1. installs the wheels in .whl/ (`make gpu-wheels`: hydra-core, omegaconf, antlr4's runtime,
#    loguru, which that machine's image lacks) into $GPU_CHECK_SITE, and puts it and this tree
#    on PYTHONPATH (rlrun runs from the tree, not installed: its built-in tracker list applies);
# 2. runs the tests marked `gpu` (the files that have any), with a JUnit report;
# 3. runs the default experiment (SFT, then 50 RL steps) on one GPU shared by the local
#    inference server and the trainer, a bigger tiny model (hidden 512, 8 layers), bf16,
#    monitor=gpu, logger=jsonl;
# 4. writes gpu_check.json (scripts/gpu_check_summary.py) into $OUT (the folder whose files
#    come back from the device machine; unset: the run directory), and into $OUT (unset:
#    $GPU_CHECK_WORK) the whole log, gpu_check.log, and the run's record (logs, metrics, config)
#    as run_record.tar.gz.
#
# Within ~8 minutes on an H100: each step has its own timeout (GPU_CHECK_PYTEST_S, GPU_CHECK_RUN_S).
# Extra arguments go to the run (`scripts/gpu_check.sh max_steps=20`). Exit code: the run's, else pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
RUN=$WORK/run
DEST=${OUT:-$WORK}
rm -rf "$WORK" && mkdir -p "$WORK" "$DEST"
LOG=$DEST/gpu_check.log
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
say() { echo "== gpu_check [$(( $(date +%s) - start ))s] $*"; }

# ---- 1. wheels and paths
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) wheels into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { say "wheel install failed"; exit 3; }
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  say "no .whl/ (make gpu-wheels): using $PY's own packages"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF' || { say "rlrun does not import"; exit 3; }
import sys, torch, hydra, omegaconf, loguru, rlrun.__main__
from rlrun.tracking.backends import plugins
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), hydra {hydra.__version__}, "
      f"omegaconf {omegaconf.__version__}, loguru {loguru.__version__}; trackers {sorted(plugins())}")
print("cuda:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# ---- 2. the gpu tests
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
say "pytest -m gpu: $GPU_TESTS"
t0=$(date +%s)
timeout "${GPU_CHECK_PYTEST_S:-200}" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --junitxml="$WORK/pytest.xml" $GPU_TESTS
pytest_rc=$?
pytest_s=$(( $(date +%s) - t0 ))
say "pytest exit code $pytest_rc in ${pytest_s}s"

# ---- 3. the default experiment on one GPU
if [ "$DEVICE" = cpu ]; then  # the pipeline's proof on a CPU: the small default model, a few steps
  ARGS=(model.dtype=bfloat16 sft.max_steps=20 max_steps=12 monitor=gpu logger=jsonl)
else
  ARGS=(inference.device=cuda trainer.device=cuda inference.gpu_memory_fraction=0.3 model.dtype=bfloat16
        model.hidden_size=512 model.num_layers=8 model.num_heads=8 model.intermediate_size=1024
        max_steps=50 monitor=gpu monitor.collection_interval=0.5 logger=jsonl)
fi
say "python -m rlrun ${ARGS[*]} $*"
t0=$(date +%s)
timeout "${GPU_CHECK_RUN_S:-270}" "$PY" -m rlrun hydra.run.dir="$RUN" "${ARGS[@]}" "$@"
run_rc=$?
run_s=$(( $(date +%s) - t0 ))
say "run exit code $run_rc in ${run_s}s"

# ---- 4. what it saw
"$PY" scripts/gpu_check_summary.py "$RUN" --junit "$WORK/pytest.xml" ${OUT:+--out "$OUT"} --set check_device=$DEVICE \
  --set pytest_exit_code=$pytest_rc --set pytest_s=$pytest_s --set run_exit_code=$run_rc --set run_s=$run_s \
  --set "total_s=$(( $(date +%s) - start ))"
if [ -d "$RUN" ]; then
  tar -czf "$DEST/run_record.tar.gz" -C "$RUN" --exclude=model --exclude=sft/model --exclude=weights \
    --exclude=checkpoints --exclude=rollouts --exclude=exports . 2>/dev/null
fi
say "done: ${OUT:-$RUN}/gpu_check.json"
[ "$run_rc" -ne 0 ] && exit "$run_rc"
exit "$pytest_rc"
