#!/usr/bin/env bash
# GPU figures for the README, in one short run on one CUDA GPU, from the repository root:
#   1. the layer benchmark in bf16 and fp32;
#   2. training throughput and peak memory of full-rank / LoRA / MoRA / ReMoRA (bench_train.py, bf16, ZeRO-2);
#   3. 30 steps of configs/remora_250m.json (the paper's 250M shape) on the shipped corpus, with 3 ReMoRA merges;
#   4. MoRA on megatron's real Transformer Engine layers: the real-TE cases of
#      tests/integration/test_parallel_te.py (-k real_te: TP = 1 on one GPU, TP = 2 needs two; the stand-in cases are
#      for CPU-only hosts). They need transformer_engine and megatron-core importable, and -rs prints why a case
#      skipped. This script does not install TE: the machine reaches no package registry, TE's core wheel
#      (transformer-engine-cu13 2.20.2) is 276 MB, more than a run can carry, and transformer-engine-torch is
#      published as source only (built against the local torch with nvcc, longer than a run).
# Results go to $OUT (default gpu_results/). Each step has its own time limit so one slow step cannot eat the rest.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)" \
  2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

timeout 180 python benchmarks/bench_layer.py --device cuda --threads 0 --dtypes bf16,fp32 --repeats 20 --warmup 5 \
  --out "$OUT/bench_layer_h200.json" 2>&1 | tee "$OUT/bench_layer_h200.txt"

timeout 140 python benchmarks/bench_train.py --rounds 1 --hidden 1024 --layers 8 --seq 1024 --batch 8 --steps 30 \
  --dtype bfloat16 --r 64 --json="$OUT/bench_train_h200.json" 2>&1 | tail -8 | tee "$OUT/bench_train_h200.txt"

timeout 180 python -m torch.distributed.run --standalone --nproc_per_node 1 launch/pretrain.py \
  --config configs/remora_250m.json \
  --set data.sources.0.path=data/shakespeare/plays.txt.gz --set data.sources.0.format=text --set data.sources.0.eval_blocks=32 \
  --set data.tokenizer=data/shakespeare/tokenizer.json --set data.streaming=false --set data.num_proc=8 \
  --set data.cache_dir=/tmp/hf_cache --set optimizer.torch_adam=true \
  --set training.max_steps=30 --set training.micro_batch_size=16 --set training.global_batch_size=64 \
  --set training.eval_interval=0 --set training.save_interval=0 --set training.log_interval=1 \
  --set training.output_dir=/tmp/remora_250m --set remora.merge_every=10 \
  --set scheduler.warmup_steps=5 --set scheduler.restart_warmup_steps=2 "$@" 2>&1 | tee "$OUT/remora_250m_h200.txt"

timeout 300 python -m pytest tests/integration/test_parallel_te.py -q -rs -k real_te -p no:cacheprovider 2>&1 \
  | tee "$OUT/te_layers_h200.txt"
