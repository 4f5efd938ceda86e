#!/usr/bin/env bash
# Every GPU check of issue #17 in one call on a lent GPU machine (one GPU, no network), inside
# GPU_TOTAL_S seconds (default 450): each part has its own timeout, cut to what is left, so a
# part that fails or hangs does not lose the others. Logs and results go to $OUT (7 files).
#
#   bash bench/gpu.sh            # from the repository root, with the torchao wheel in .whl/
#
# 1. bench/gpu.py: llama3-1b (vocabulary 128,256) bf16 before/after the chunked loss, float8
#    tensorwise and rowwise, no-AC; profiles          -> gpu.log, results.json, summary.md
# 2. tests/test_gpu.py (bf16 eager and compiled, chunked loss on CUDA, float8) -> test_gpu.log
# 3. one FSDP and one pipeline-parallel run of the trainer: two processes over gloo on this
#    machine's CPUs with its torch (one GPU cannot hold two NCCL ranks, and a world of one
#    shards nothing)                                  -> layouts.log
# 4. bench/checkpoint_stall.py, gpt2-124m (a 1B round takes minutes) -> checkpoint.log
# env.log: the GPU, torch, torchao.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${GPU_TOTAL_S:-450}))
export PYTHONUNBUFFERED=1

left() { echo $((DEADLINE - $(date +%s))); }
# part NAME SECONDS LOG COMMAND...: run COMMAND with at most SECONDS (or what is left), tee'd to LOG.
part() {
    local name=$1 want=$2 log=$3
    shift 3
    local budget
    budget=$(left)
    [ "$want" -lt "$budget" ] && budget=$want
    if [ "$budget" -lt 15 ]; then
        echo "== $name: skipped, $(left) s left" | tee -a "$OUT/$log"
        return
    fi
    echo "== $name (at most ${budget} s, $(( $(date +%s) - START )) s in): $*" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$OUT/$log"
    echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START )) s" | tee -a "$OUT/$log"
}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/env.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw --format=csv
    python3 -c "import sys, torch, torchao; print(sys.version.split()[0], 'torch', torch.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())"
} >> "$OUT/env.log" 2>&1

part "bench/gpu.py" 330 gpu.log python3 bench/gpu.py --out "$OUT" --budget-s 250
part "tests/test_gpu.py" 150 test_gpu.log python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py

DATA=/tmp/gt-data
part "prepare" 30 layouts.log python3 -m gigatrain prepare gigatrain --out $DATA --tokenizer byte --overwrite
TINY="--model.preset=tiny --data.seq_len=64 --train.batch_size=8 --train.max_steps=10 --train.device=cpu
      --train.samples=0 --train.eval_batches=2 --train.progress=plain --data.path=$DATA"
# shellcheck disable=SC2086
part "FSDP (dp_shard=2, gloo)" 60 layouts.log python3 -m torch.distributed.run --standalone --nproc-per-node=2 \
    -m gigatrain train $TINY --run.dir=/tmp/gt-fsdp
# shellcheck disable=SC2086
part "pipeline (pp=2, 1F1B, gloo)" 60 layouts.log python3 -m torch.distributed.run --standalone --nproc-per-node=2 \
    -m gigatrain train $TINY --parallel.pp=2 --parallel.dp_shard=1 --run.dir=/tmp/gt-pp

part "bench/checkpoint_stall.py" 90 checkpoint.log python3 bench/checkpoint_stall.py --preset gpt2-124m --rounds 2
echo "== done in $(( $(date +%s) - START )) s; files: $(ls "$OUT" | tr '\n' ' ')"
