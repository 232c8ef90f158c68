#!/usr/bin/env bash
# The ablation ladder of learned remask policies on the embedded model (README "Results"), as run on one GPU:
#   1. the training split, regenerated exactly as the shipped model's (seed 0, same sizes, so the
#      held-out test items are never trained on);
#   2. UPS heads by Remask SFT on the frozen backbone: the shipped recipe with random (batch-unigram)
#      corruptions, and on-policy corruptions (the model's own predictions) at several settings;
#   3. a head trained on the states of the sampler's own trajectories (labels: token == gold), and Remask RL;
#   4. the exact sampler (no cache, no EOS gating: equal NFE for every source) on the first N test items,
#      every heuristic once, every learned head with entropy beside it for the paired test.
# Sizes come from env vars so a CPU smoke run can use tiny numbers:
#   N_TRAIN=2000 UPS_STEPS=3 TRAJ_PROBLEMS=8 TRAJ_STEPS=2 RL_UPDATES=1 N_EVAL=8 BS=8 DEVICE=cpu \
#       bash scripts/embedded_ladder.sh
source "$(dirname "$0")/stages.sh"
OUT=${LADDER_OUT:-runs/ladder}
MODEL=${MODEL:-checkpoints/remedi-tiny-gsm}
N_TRAIN=${N_TRAIN:-20000}
UPS_STEPS=${UPS_STEPS:-600}
BS=${BS:-256}
N_EVAL=${N_EVAL:-2000}
STEPS=${STEPS:-48}
RL_UPDATES=${RL_UPDATES:-40}
STAGES=${STAGES:-"data heads traj rl eval"}
VARIANTS=${VARIANTS:-"self_r025 self_r025_confident self_r010 mix_r025"}
mkdir -p "$OUT"
DATA="$OUT/data"

if stage data && todo "$DATA/train.jsonl"; then  # the test split does not depend on N_TRAIN (own seeds)
    $PY -c "import json, os, sys; from remedi.tasks import arith
s = arith.make_splits(int(sys.argv[2]), 1000, 3000, seed=0); os.makedirs(sys.argv[1], exist_ok=True)
f = os.path.join(sys.argv[1], 'train.jsonl')
with open(f + '.tmp', 'w') as o: o.writelines(json.dumps(r) + '\\n' for r in s['train'])
os.replace(f + '.tmp', f)  # a killed run leaves no torn train.jsonl behind" \
        "$DATA" "$N_TRAIN"
fi

head() {  # name, extra flags...
    local name=$1; shift
    todo "$OUT/$name.pt" || return 0
    $PY remedi/train_remask_sft.py $(resume "$OUT/train_$name") --model_name "$MODEL" --dataset "$DATA/train.jsonl" --prompt_field question \
        --answer_field answer --prompt_format plain --seq_len 192 --pad_to batch --ups_arch head --ups_width 128 \
        --lambda_ups 1.0 --batch_size "$BS" --max_steps "$UPS_STEPS" --lr 1e-3 --warmup_steps 100 \
        --output_dir "$OUT/train_$name" --save_path "$OUT/$name.pt" --seed 1 "$@"
}
if stage heads; then
    for v in $VARIANTS; do
        case $v in
            self_r025) head "$v" --noise_source self --r_incorrect 0.25 ;;
            self_r025_confident) head "$v" --noise_source self --r_incorrect 0.25 --self_noise_select confident ;;
            self_r010) head "$v" --noise_source self --r_incorrect 0.1 ;;
            self_r025_t1) head "$v" --noise_source self --r_incorrect 0.25 --self_noise_temperature 1.0 ;;
            mix_r025) head "$v" --noise_source self --self_noise_ratio 0.5 --r_incorrect 0.25 ;;
            *) echo "unknown variant $v" >&2; exit 2 ;;
        esac
    done
fi

TRAJ_PROBLEMS=${TRAJ_PROBLEMS:-3000}
TRAJ_STEPS=${TRAJ_STEPS:-1500}
if stage traj && todo "$OUT/traj_entropy.pt"; then  # labels from the sampler's own trajectories
    $PY -m remedi.training.trajectory_labels --model_name "$MODEL" --ups_head "$MODEL/ups_head.pt" \
        --dataset "$DATA/train.jsonl" --n_problems "$TRAJ_PROBLEMS" --strategy entropy --steps "$STEPS" --every 1 \
        --train_steps "$TRAJ_STEPS" --batch_size "$BS" --lr 1e-3 --save_path "$OUT/traj_entropy.pt" --seed 0 \
        --log_every 100 ${DEVICE:+--device $DEVICE}
fi

RL_FROM=${RL_FROM:-self_r025}
if stage rl && todo "$OUT/rl_$RL_FROM.pt"; then
    $PY remedi/train_remask_rl.py $(resume "$OUT/rl_run_$RL_FROM") --model_name "$MODEL" --ups_head "$OUT/$RL_FROM.pt" --dataset "$DATA/train.jsonl" \
        --format gsm8k --max_updates "$RL_UPDATES" --output_dir "$OUT/rl_run_$RL_FROM" \
        --save_ups_head "$OUT/rl_$RL_FROM.pt" --seed 4 ${RL_FLAGS:-}
fi

ev() {  # output name, --ups_head file, sources, [extra]
    local name=$1 ups=$2 src=$3; shift 3
    $PY remedi/eval_gsm_math.py --model_name "$MODEL" --ups_head "$ups" --max_samples "$N_EVAL" --infer_bs 500 \
        --dtype fp32 --steps "$STEPS" --cache none --eos_gating false --sources "$src" --trajectory_out none \
        --output_dir "$OUT/eval_$name" "$@"
}
if stage eval; then
    ev heuristics "$MODEL/ups_head.pt" llada_low_confidence,tps_prob,margin,entropy,random,ups
    for f in "$OUT"/*.pt; do
        n=$(basename "$f" .pt)
        [ -f "$OUT/eval_$n/summary.json" ] || ev "$n" "$f" entropy,ups
    done
fi
