#!/bin/bash
# session 10: two-pass dK/dV candidates at D 128 (tests, tune, before/after)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
timeout 150 python -m pytest -m gpu -q -n 12 -p no:cacheprovider --timeout 140 tests/test_flash_kernels.py \
  -k "two_pass" > $OUT/tests_d.log 2>&1; echo "tests rc=$? $(( $(date +%s)-t0 ))s" >> $OUT/stages.txt
t0=$(date +%s)
python benchmarks/bench_head_dims.py --out /tmp/hd_before --dims 64,96,128 --modes fwdbwd > $OUT/hd_before.log 2>&1
echo "hd_before rc=$? $(( $(date +%s)-t0 ))s" >> $OUT/stages.txt
t0=$(date +%s)
HF_ATTN_PLUGIN_VERBOSE=1 timeout 300 python benchmarks/tune_tables.py --out /tmp/tune --dims 128 \
  --seqs 16384,4096,2048,1024,512 --groups 1,4 --causal 1,0 --kinds bwd_dkdv --merge --budget-s 250 > $OUT/tune128.log 2>&1
echo "tune rc=$? $(( $(date +%s)-t0 ))s" >> $OUT/stages.txt
cp /tmp/tune/sm90.merged.json $OUT/ && cp /tmp/tune/sm90.merged.json hf_attn_plugin/kernels/tuned/sm90.json
t0=$(date +%s)
python benchmarks/bench_head_dims.py --out /tmp/hd_after --dims 64,96,128 --modes fwdbwd > $OUT/hd_after.log 2>&1
echo "hd_after rc=$? $(( $(date +%s)-t0 ))s" >> $OUT/stages.txt
cat $OUT/stages.txt; tail -3 $OUT/tests_d.log; grep -v "^\[hf" $OUT/tune128.log | tail -24; grep ours $OUT/hd_before.log $OUT/hd_after.log
