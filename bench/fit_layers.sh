#!/usr/bin/env bash
# Layers of the real-width dummy model (3 dense + the rest MoE) that fit this machine's first GPU: 27 from 130 GB
# (an H200), else 15 (an H100: 24 MoE layers of 161 experts are ~91 GB of FP8 weights, 12 are ~51 GB).
#     LAYERS=$(bash bench/fit_layers.sh)
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc '0-9')
[ "${mem_mib:-0}" -ge 130000 ] && echo 27 || echo 15
