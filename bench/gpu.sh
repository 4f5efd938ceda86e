#!/usr/bin/env bash
# Every GPU figure of this round in one call on a lent GPU machine (one GPU, no network), inside
# GPU_TOTAL_S seconds (default 420): each part has its own timeout, cut to what is left, so a part
# that fails or hangs does not lose the others. Parts in order of priority; logs go to $OUT.
#
#   bash bench/gpu.sh            # from the repository root, with the torchao wheel in .whl/
#
# 1. bench/gpu.py: llama3-1b (vocabulary 128,256) bf16 after/before the chunked loss, no-AC,
#    float8 tensorwise and rowwise; profiles; the async checkpoint of the 1B training state
#                                                        -> gpu.log, results-1b.json
# 2. a Mixtral-8x7B slice (2 layers at full width, bf16, compile, grouped GEMM) through the
#    trainer: tokens/s and MFU on active FLOPs          -> gpu.log, results-mixtral.json
# 3. tests/test_gpu.py on this machine's torch          -> tests.log
# 4. bench/optimizer_overhead.py: Muon against AdamW on llama3-1b under FSDP2 -> extra.log
# In the background from the start, on the CPUs: one FSDP and one pipeline-parallel run of the
# trainer, two processes over gloo with this machine's torch (one GPU cannot hold two NCCL ranks,
# and a world of one shards nothing)                    -> layouts.log
# env.log: the GPU, torch, torchao.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${GPU_TOTAL_S:-420}))
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

layouts() {
    local data=/tmp/gt-data tiny
    python3 -m gigatrain prepare gigatrain --out $data --tokenizer byte --overwrite
    tiny="--model.preset=tiny --data.seq_len=64 --train.batch_size=8 --train.max_steps=10 --train.device=cpu
          --train.samples=0 --train.eval_batches=2 --train.progress=plain --data.path=$data"
    # shellcheck disable=SC2086
    echo "== FSDP (dp_shard=2, gloo)"; OMP_NUM_THREADS=2 python3 -m torch.distributed.run --standalone --nproc-per-node=2 \
        -m gigatrain train $tiny --run.dir=/tmp/gt-fsdp; echo "== FSDP exit $?"
    # shellcheck disable=SC2086
    echo "== pipeline (pp=2, 1F1B, gloo)"; OMP_NUM_THREADS=2 python3 -m torch.distributed.run --standalone --nproc-per-node=2 \
        --master-port=29533 -m gigatrain train $tiny --parallel.pp=2 --parallel.dp_shard=1 --run.dir=/tmp/gt-pp; echo "== pipeline exit $?"
}
timeout 300 bash -c "$(declare -f layouts); layouts" > "$OUT/layouts.log" 2>&1 &

part "bench/gpu.py llama3-1b" 260 gpu.log python3 bench/gpu.py --out "$OUT" --tag 1b --budget-s 200 --batch-size 8 \
    --checkpoint-step 45 --variants after,after-noac,before,fp8-tensor,fp8-row
part "bench/gpu.py mixtral-8x7b slice" 80 gpu.log python3 bench/gpu.py --out "$OUT" --tag mixtral --preset mixtral-8x7b \
    --vocab-size 32000 --seq-len 4096 --batch-size 2 --micro-batch 1 --variants after --loss-steps 12 --warmup-steps 4 \
    --override=--model.n_layers=2
part "tests/test_gpu.py" 75 tests.log python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
part "bench/optimizer_overhead.py" 80 extra.log python3 bench/optimizer_overhead.py
wait
echo "== done in $(( $(date +%s) - START )) s; files: $(ls "$OUT" | tr '\n' ' ')"
