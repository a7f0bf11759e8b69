#!/bin/bash
# GPU runs by stage: bash benchmarks/run_gpu.sh STAGE [STAGE ...]; logs and CSVs go to $OUT (default /tmp/out),
# results to $OUT/results (copy the CSVs to benchmarks/results/ and run `python benchmarks/report.py`).
# Stages and their wall time on one H200 (cold Triton cache):
#   tests       pytest -m gpu -v (xdist, 15 workers; a line per test, so a cut run still names its failures) ~360 s
#   fuzz        test_fuzz_gpu_bf16 alone, -s -x: prints the first failing case  (minutes: compiles)
#   host        profile_host_fwdbwd.py: host time per fwd / fwd+bwd call, ours vs SDPA, cProfile ~60 s
#   quickstart  the README's two GPU commands (install + demo; install .[test])  ~60 s
#   models      bench_flash.py --models (the README's main table)           ~150 s
#   head_dims   bench_head_dims.py (D 32..256, fwd and fwd+bwd)             ~150 s
#   cold_start  bench_cold_start.py: plugin, cold Triton cache, 2k new tokens; eager/sdpa/plugin warm, 600 ~180 s
#   generate    bench_generate.py, B=1, dynamic and compiled static routes  ~150 s
#   decode      bench_decode.py (decode kernels beside SDPA)                ~120 s
#   decode_probe  probe_decode_configs.py: decode route, block-table path and SDPA cuDNN per shape, then --mla
#               (DeepSeek shapes: decode route vs the flash path vs SDPA) ~90 s
#   generate16  bench_generate.py at B=16, dynamic and compiled static routes, sdpa and plugin (issue 17 item 2) ~150 s
#   tune        tune_tables.py for D 64/128/256 (writes $OUT/tune/sm90.json) ~200 s
#   tune_fwd    tune_tables.py, forward only at D 128/64, S 16k..512 (Gluon and Triton candidates), with --merge
#               ($OUT/tune/sm90.merged.json; budget TUNE_BUDGET s, default 150) ~200 s
#   tune_dkdv256  tune_tables.py, dK/dV only at D 256 (every candidate's time in the log; $OUT/tune/sm90.merged.json
#               is the shipped table with these entries put in) ~60 s
#   probe_steps probe_generate_steps.py (B=1 per-step clocks, plain and compiled static routes, dynamo counters)
#               ~240 s
#   probe_b1    probe_b1_host.py (B=1 generate(): eager/plugin/sdpa interleaved in one process) ~60 s
#   steps16     probe_generate_steps.py at B=16 then B=1, plain route only (per-step medians, cProfile of plugin) ~120 s
#   static_prefill  probe_static_prefill.py: the prefill alone on the dynamic and static routes, sdpa vs plugin, B=1
#               and 16, with torch.profiler tables (issue 17 item 2: the static route's prefill gap) ~90 s
#   prefix      bench_generate_batch.py --shared-prefix 1024 (128 requests, KV pages with/without sharing) ~90 s
#   sliding     bench_generate_batch.py --sliding-window 256 (windowed/global layers: KV memory, tok/s) ~90 s
#   engine      bench_generate_batch.py: our engine vs engine="transformers" vs sdpa, two samples each ~120 s
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-/tmp/out}
RES=$OUT/results
mkdir -p "$OUT" "$RES"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$OUT/gpu.txt"
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    # The bf16 fuzz runs in its own stage: its 100 examples compile ~100 kernel variants (minutes).
    tests) timeout ${TESTS_TIMEOUT:-560} python -m pytest -m gpu -v -rfE -n 15 -p no:cacheprovider --timeout 240 \
             --durations=25 --deselect tests/test_fuzz.py::test_fuzz_gpu_bf16 --junitxml="$OUT/gpu_junit.xml" \
             tests > "$OUT/gpu_tests.log" 2>&1 ;;
    fuzz) timeout ${FUZZ_TIMEOUT:-560} python -m pytest -m gpu -s -x -p no:xdist -p no:cacheprovider \
            tests/test_fuzz.py::test_fuzz_gpu_bf16 > "$OUT/fuzz.log" 2>&1 ;;
    host) ( python benchmarks/profile_host_fwdbwd.py && echo "=== HF_ATTN_PLUGIN_GLUON=0 ===" &&
            HF_ATTN_PLUGIN_GLUON=0 python benchmarks/profile_host_fwdbwd.py --profile-rows 0 ) > "$OUT/host.log" 2>&1 ;;
    # The README's two GPU commands. Offline machines: put setuptools/wheel/packaging wheels in .whl/ (pip's build
    # isolation installs them from there instead of the index); the runtime and test dependencies must already be
    # installed. (the second command's `pytest -m gpu` is the tests stage).
    quickstart) ( [ -d .whl ] && export PIP_FIND_LINKS=$PWD/.whl PIP_NO_INDEX=1
                  python -m pip install -q -e . && hf-attn-plugin-demo &&
                  python -m pip install -q -e ".[test]" ) > "$OUT/quickstart.log" 2>&1 ;;
    models) python benchmarks/bench_flash.py --out "$RES" --models > "$OUT/models.log" 2>&1 ;;
    head_dims) python benchmarks/bench_head_dims.py --out "$RES" > "$OUT/head_dims.log" 2>&1 ;;
    cold_start) ( python benchmarks/bench_cold_start.py --out "$RES" --impls plugin --caches cold --new 2048 &&
                  python benchmarks/bench_cold_start.py --out "$RES" --impls sdpa plugin eager --caches warm \
                    --new 600 ) > "$OUT/cold_start.log" 2>&1 ;;
    generate) python benchmarks/bench_generate.py --out "$RES" --routes dynamic static > "$OUT/generate.log" 2>&1 ;;
    decode) python benchmarks/bench_decode.py --out "$RES" > "$OUT/decode.log" 2>&1 ;;
    decode_probe) ( mkdir -p "$OUT/mla" && python benchmarks/probe_decode_configs.py --out "$RES" &&
                    python benchmarks/probe_decode_configs.py --out "$OUT/mla" --mla ) > "$OUT/decode_probe.log" 2>&1 ;;
    generate16) python benchmarks/bench_generate.py --out "$RES" --routes dynamic static --batch 16 \
                  --impls sdpa plugin > "$OUT/generate16.log" 2>&1 ;;
    tune) python benchmarks/tune_tables.py --out "$OUT/tune" --dims 64,128,256 --budget-s 200 > "$OUT/tune.log" 2>&1 ;;
    tune_fwd) HF_ATTN_PLUGIN_VERBOSE=1 python benchmarks/tune_tables.py --out "$OUT/tune" --dims 128,64 \
                --seqs 16384,8192,4096,2048,1024,512 --kinds fwd --merge --budget-s ${TUNE_BUDGET:-150} \
                > "$OUT/tune.log" 2>&1 ;;
    tune_dkdv256) HF_ATTN_PLUGIN_VERBOSE=1 python benchmarks/tune_tables.py --out "$OUT/tune" --dims 256 \
                    --seqs 4096,1024 --groups 1,4 --causal 1,0 --kinds bwd_dkdv --merge > "$OUT/tune.log" 2>&1 ;;
    probe_b1) python benchmarks/probe_b1_host.py > "$OUT/probe_b1.log" 2>&1 ;;
    probe_steps) python benchmarks/probe_generate_steps.py > "$OUT/probe_steps.log" 2>&1 ;;
    steps16) ( cd benchmarks && python probe_generate_steps.py --batch 16 --impls sdpa plugin --profile plugin \
                 --new 128 --static-new 0 && python probe_generate_steps.py --batch 1 --impls sdpa plugin eager \
                 --profile --new 128 --static-new 0 ) > "$OUT/steps16.log" 2>&1 ;;
    static_prefill) python benchmarks/probe_static_prefill.py > "$OUT/static_prefill.log" 2>&1 ;;
    prefix) python benchmarks/bench_generate_batch.py --out "$RES" --shared-prefix 1024 --new-tokens 32 \
              > "$OUT/prefix.log" 2>&1 ;;
    sliding) python benchmarks/bench_generate_batch.py --out "$RES" --sliding-window 256 --new-tokens 64 \
               > "$OUT/sliding.log" 2>&1 ;;
    engine) python benchmarks/bench_generate_batch.py --out "$RES" --impls plugin,engine,sdpa,plugin,engine,sdpa \
              > "$OUT/engine.log" 2>&1 ;;
    *) echo "unknown stage $stage (see the header of $0)"; exit 2 ;;
  esac
  echo "$stage: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/stages.txt"
done
