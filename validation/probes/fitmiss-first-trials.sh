m() { n=$1; shift; timeout 170 python3 -m memfit.cli measure "$@" --out $OUT/$n.json > $OUT/$n.log 2>&1; echo "$n rc=$?"; tail -2 $OUT/$n.log; }
( m fm1-llama-3.1-8b-prefill-2k-b16 llama-3.1-8b --task infer --precision bf16-true --prompt-len 2048 --new-tokens 0 --batch-size 16 --gpu-memory 24GiB --steps 1
  m fm2-qwen3-1.7b-gen-b127 qwen3-1.7b --task infer --precision bf16-true --prompt-len 512 --new-tokens 128 --batch-size 127 --gpu-memory 16GiB --steps 1
  m fm3-gemma-2-2b-lora-b2 gemma-2-2b --method lora --lora-rank 16 --precision bf16-true --seq-len 1024 --batch-size 2 --gpu-memory 24GiB --steps 3
  m fm4-phi-3-mini-lora-ckpt-b13 phi-3-mini --method lora --lora-rank 16 --precision bf16-true --seq-len 2048 --gradient-checkpointing --batch-size 13 --gpu-memory 24GiB --steps 3 ) &
( m fm5-mistral-7b-gen-unpadded-b116 mistral-7b-v0.3 --task infer --precision bf16-true --prompt-len 1024 --new-tokens 128 --batch-size 116 --gpu-memory 48GiB --steps 1
  m fm6-mistral-7b-gen-unpadded-b117 mistral-7b-v0.3 --task infer --precision bf16-true --prompt-len 1024 --new-tokens 128 --batch-size 117 --gpu-memory 48GiB --steps 1 ) &
wait
