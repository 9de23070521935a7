#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one device-tool call (about 10 minutes):
# build, the GPU correctness tests, then the GPU benchmarks. Logs and CSVs go to $OUT; the
# benchmark rows are also appended to bench/results/ (copy them back from $OUT and commit).
#   run: bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/smartfrz_gpu}
mkdir -p "$OUT"
unset TRITON_INTERPRET            # compiled kernels, not the CPU interpreter
step() { echo "== $1"; }

step "device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
step "install (the image has no internet: --no-deps; the build uses the image's torch)"
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -40 "$OUT/install.log"; exit 1; }
step "each op once on this GPU against its reference (backend used, fallbacks)"
python -m smartfrz_fast.info --check | tee "$OUT/info_check.txt"; echo "info --check rc=${PIPESTATUS[0]}"

step "GPU correctness (compiled Triton, CUDA C++, graphs, no host sync)"
python -m pytest -q -ra -p no:cacheprovider tests/test_triton_kernels.py > "$OUT/test_triton.log" 2>&1
echo "triton kernels rc=$?"; tail -3 "$OUT/test_triton.log"
python -m pytest -q -ra -p no:cacheprovider -m gpu tests --deselect tests/test_triton_kernels.py \
  > "$OUT/test_gpu.log" 2>&1
echo "gpu-marked rc=$?"; tail -3 "$OUT/test_gpu.log"
# the image has torchvision and timm (not installable beside CI's torch): the cache's real-model splits
python -m pytest -q -ra -p no:cacheprovider tests/test_cache_split.py -k real > "$OUT/test_real_models.log" 2>&1
echo "real torchvision/timm models rc=$?"; tail -3 "$OUT/test_real_models.log"

step "benchmarks"
timeout 300 python bench/bench_history_ops.py > "$OUT/bench_history_ops.log" 2>&1; echo "history ops rc=$?"
timeout 120 python bench/bench_cache.py --device cuda --csv bench/results/cache_gpu.csv > "$OUT/bench_cache.log" 2>&1
echo "cache rc=$?"
timeout 120 python bench/bench_cache.py --device cuda --sweep --csv bench/results/cache_gpu.csv \
  > "$OUT/bench_cache_sweep.log" 2>&1
echo "cache boundary sweep rc=$?"
timeout 240 python bench/bench_pinned_read.py --csv bench/results/pinned_read.csv > "$OUT/bench_pinned_read.log" 2>&1
echo "pinned read (copy vs kernel) rc=$?"
# the image has transformers and accelerate: the Trainer with the cache on a BERT-base-sized model
timeout 300 python bench/bench_hf_trainer.py --device cuda --layers 12 --hidden 768 --seq 128 --batch 32 \
  --samples 512 --frozen-layers 8 --csv bench/results/hf_trainer_gpu.csv > "$OUT/bench_hf_trainer.log" 2>&1
echo "HF Trainer rc=$?"
cp bench/results/*.csv "$OUT/" 2>/dev/null

step "summary"
tail -25 "$OUT/bench_history_ops.log"
tail -12 "$OUT/bench_cache.log"
tail -10 "$OUT/bench_cache_sweep.log"
tail -30 "$OUT/bench_pinned_read.log"
tail -5 "$OUT/bench_hf_trainer.log"
