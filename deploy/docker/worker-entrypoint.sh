#!/bin/sh
# Entry point of the worker images: give this replica a GPU of its own, then exec the command.
#
# `docker compose up --scale worker=N` starts N identical containers, and Docker maps a device
# reservation of `count: 1` to GPU 0 in every one of them. So the compose file reserves all GPUs
# for each replica and sets EDM_GPU_LOCK_DIR to a volume that all replicas share; here each
# replica takes an exclusive lock on the first free $EDM_GPU_LOCK_DIR/gpuK.lock and runs with
# CUDA_VISIBLE_DEVICES=K (the worker then sees that one GPU as cuda:0). The lock is held by the
# worker process itself (descriptor 9 survives the exec) and vanishes with it, so a restarted
# replica finds its GPU free again. More replicas than GPUs: the extra ones share a GPU.
#
# Nothing happens when EDM_DEVICE is not exactly "cuda", when EDM_GPU_LOCK_DIR is unset (e.g. on
# Kubernetes, where the device plugin already gives each pod its own GPU) or when
# CUDA_VISIBLE_DEVICES is already set.
set -eu

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
        if [ "${n:-0}" -gt 0 ]; then echo "$n"; return; fi
    fi
    python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

if [ "${EDM_DEVICE:-}" = "cuda" ] && [ -n "${EDM_GPU_LOCK_DIR:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
    count=$(gpu_count)
    if [ "$count" -gt 0 ]; then
        mkdir -p "$EDM_GPU_LOCK_DIR"
        chosen=""
        k=0
        while [ "$k" -lt "$count" ]; do
            exec 9>"$EDM_GPU_LOCK_DIR/gpu$k.lock"
            if flock -n 9; then chosen=$k; break; fi
            exec 9>&-
            k=$((k + 1))
        done
        if [ -z "$chosen" ]; then
            chosen=$(( $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % count ))
            echo "worker-entrypoint: all $count GPU(s) have a worker; sharing GPU $chosen" >&2
        else
            echo "worker-entrypoint: this replica runs on GPU $chosen of $count" >&2
        fi
        export CUDA_VISIBLE_DEVICES="$chosen"
    else
        echo "worker-entrypoint: EDM_DEVICE=cuda but no GPU is visible" >&2
    fi
fi
exec "$@"
