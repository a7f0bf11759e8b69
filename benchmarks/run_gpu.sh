#!/bin/bash
# One device call: GPU tests, then the benchmark. Logs and CSVs go to $OUT.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  HF_ATTN_PLUGIN_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-220} python3 -m pytest tests/test_flash_kernels.py -m gpu -q -n ${NPROC:-12} -p no:cacheprovider ${TEST_ARGS} 2>&1 | tee $OUT/gpu_tests.log | tail -30
fi
HF_ATTN_PLUGIN_VERBOSE=1 timeout ${BENCH_TIMEOUT:-280} python3 benchmarks/bench_flash.py --out $OUT ${BENCH_ARGS} 2>&1 | tee $OUT/bench.log | grep -v "^\[hf_attn" | tail -60
grep "^\[hf_attn" $OUT/bench.log | tail -40
