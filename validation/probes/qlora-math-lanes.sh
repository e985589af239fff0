# validation/jobs/qlora-math.yaml in three lanes at once (memory only: the records' step times are then not
# timing runs, dropped by steptime_data's shared-GPU rule); each lane is validation/run_records.py.
Y=validation/jobs/qlora-math.yaml
lane() { d=$OUT/qm-$1; shift; timeout ${QM_TIMEOUT:-260} python3 validation/run_records.py $Y --out $d --timeout 200 --only "$1"; }
lane 1 qm-mistral-7b-nf4-ckpt-b1-s2048,qm-mistral-7b-nf4-ckpt-b4-s2048,qm-mistral-7b-nf4-ckpt-b4-s1024 &
lane 2 qm-mistral-7b-nf4-ckpt-b1-s4096,qm-mistral-7b-nf4-b1-s2048,qm-qwen2.5-3b-fp4-ckpt-b2 &
lane 3 qm-mistral-7b-lora-32true-ckpt-b2-s2048,qm-llama-3.2-1b-lora-32true-ckpt-b4-s2048,qm-qwen2.5-3b-fp4-ckpt-exp &
wait
