#!/usr/bin/env bash
# The whole pipeline in one command: RLAIF (SFT -> AI labels -> RM -> PPO) and the RLHF baseline (RM on human
# labels -> PPO), then the evaluation.
#
#   bash run_pipeline.sh [preset] [extra flags for every stage]     # preset: tiny (default), micro, smol, gpt2-large,
#                                                                   # hh-tiny, hh-micro (the offline dialogue task)
#
# smol: SmolLM2-135M-Instruct as the policy (LoRA, fp32) on the tiny task, converted first into
# runs/models/smollm2-135m-instruct if it is not there (python -m minirlaif.smollm2; README "Quick start" installs
# it). RLHF=0 leaves out the RLHF branch (stages 5-6), as README's SmolLM2 result does: RLHF=0 bash run_pipeline.sh smol
#
# Outputs go to runs/<preset>/ under the current directory. Rerun after a kill, or after changing one stage's
# flags: a stage whose metrics.json exists and whose manifest holds the same config is skipped (each script
# checks this itself), and an interrupted stage resumes from its checkpoint. PYTHON picks the interpreter;
# for gpt2-large on several GPUs, set LAUNCH="torchrun --nproc_per_node 4" for the training stages. PARALLEL=1|0
# runs the RLAIF and RLHF branches side by side or one after the other (default: side by side on the CPU
# presets tiny and micro, in a row for smol and gpt2-large, whose stages each want every core or GPU).
#
# ALGOS="reinforce rloo grpo reinforce++ dr-grpo direct" (any subset, default none) also trains those RL variants
# on the same SFT model and episode budget after the RLAIF and RLHF branches, each into runs/<preset>/<variant>,
# and evaluate.py compares each with SFT and with PPO-RLAIF (report.md's "Algorithms" table):
#   reinforce    --algo reinforce (the paper's REINFORCE with a value baseline, on the AI RM)
#   rloo, grpo   --algo rloo / grpo (no value model, k = 4 samples per query, on the AI RM)
#   reinforce++  --algo reinforce++ (the reward-to-go, globally whitened; no value model, on the AI RM)
#   dr-grpo      --algo dr-grpo (the group mean baseline, token sums over a constant length, k = 4; on the AI RM)
#   direct       --reward direct --algo rloo (d-RLAIF: the labeler's 1-10 ratings are the reward; no RM)
#
# SEEDS="1 2 3" runs the whole pipeline once per seed (`--seed N` for every stage), each under seeds/seedN/ (its
# own runs/<preset>/), then aggregates the evaluations into runs/<preset>/seeds/report.md: per comparison each
# seed's win rate, the mean and a 95% t-interval over seeds (evaluate.py --aggregate).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
preset="${1:-tiny}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
launch="${LAUNCH:-$python}"
runs="runs/$preset"
start=$SECONDS

if [[ -n "${SEEDS:-}" ]]; then
    aggregate=()
    for seed in $SEEDS; do
        echo "=== seed $seed: seeds/seed$seed/"
        mkdir -p "seeds/seed$seed"
        (cd "seeds/seed$seed" && SEEDS="" bash "$here/run_pipeline.sh" "$preset" "$@" --seed "$seed")
        aggregate+=(--aggregate "seeds/seed$seed/$runs/eval")
    done
    "$python" "$here/evaluate.py" --preset "$preset" "${aggregate[@]}" --out-dir "$runs/seeds"
    echo "=== $(wc -w <<< "$SEEDS") seeds finished in $((SECONDS - start)) s; report: $runs/seeds/report.md"
    exit 0
fi

export PYTHONUNBUFFERED=1  # each stage's lines appear as they are printed
exec 3>&1  # the terminal, also while a branch's output goes to its log file
stage() {  # stage NAME LAUNCHER SCRIPT [flags...]: when it ends, one line with its time and headline numbers
    local name="$1" launcher="$2" script="$3"
    shift 3
    local t0=$SECONDS out said status
    echo "=== $name: $script --preset $preset $*"
    out=$(mktemp)
    set +e
    $launcher "$here/$script" --preset "$preset" "$@" | tee "$out"
    status=${PIPESTATUS[0]}
    set -e
    # the stage's own last word: "=== <stage> finished in N s: <numbers> (<dir>)", or why it skipped
    said=$(grep -E "^=== [^ ]+ finished in |; skipping" "$out" | tail -n 1 | sed -E 's/^=== [^ ]+ finished in [0-9]+ s:? ?//')
    rm -f "$out"
    [[ $status == 0 ]] || return "$status"
    if [[ -n "${IN_BRANCH:-}" ]]; then  # a branch's log is not the terminal: say it there too, with its numbers
        echo "=== $name done in $((SECONDS - t0)) s${said:+: $said}" | tee /dev/fd/3
    else
        echo "=== $name done in $((SECONDS - t0)) s"
    fi
}

if [[ "$preset" == smol && ! -f runs/models/smollm2-135m-instruct/model.safetensors ]]; then
    echo "=== 0/7 SmolLM2-135M-Instruct: python -m minirlaif.smollm2 --out-dir runs/models/smollm2-135m-instruct"
    "$python" -m minirlaif.smollm2 --out-dir runs/models/smollm2-135m-instruct
fi
stage "1/7 SFT" "$launch" train_sft.py "$@"
# the AI labels come before both branches: the RLHF reward model scores itself on their test split too
# (acc_ai_test), so it must never read a pairs.jsonl that is still being written (its numbers would depend on timing)
stage "2/7 AI labels" "$python" label.py "$@"

rlaif() {
    stage "3/7 RLAIF reward model" "$launch" train_rm.py "$@"
    stage "4/7 RLAIF policy (PPO)" "$launch" train_ppo.py "$@"
}
rlhf() {
    stage "5/7 RLHF reward model" "$launch" train_rm.py --feedback human "$@"
    stage "6/7 RLHF policy (PPO)" "$launch" train_ppo.py --rm-path "$runs/rm_human" --out-dir "$runs/ppo_rlhf" "$@"
}

# The RLAIF and RLHF branches are independent after the labels. On a CPU preset they run side by side with one thread
# each: a tiny model's small matrix products scale poorly past one core, so two 1-thread jobs finish well before
# two 2-thread jobs in a row. Each branch's output goes to its own log file.
if [[ "${RLHF:-1}" == 0 ]]; then
    echo "=== RLHF=0: the RLHF branch (stages 5-6) is left out"
    rlaif "$@"
elif [[ "${PARALLEL:-auto}" == 1 || ( "${PARALLEL:-auto}" == auto && "$preset" != gpt2-large && "$preset" != smol ) ]]; then
    mkdir -p "$runs/logs"
    echo "=== RLAIF (stages 3-4) and RLHF (stages 5-6) side by side; logs: $runs/logs/{rlaif,rlhf}.log"
    IN_BRANCH=1 OMP_NUM_THREADS=1 rlaif "$@" > "$runs/logs/rlaif.log" 2>&1 &
    rlaif_pid=$!
    IN_BRANCH=1 OMP_NUM_THREADS=1 rlhf "$@" > "$runs/logs/rlhf.log" 2>&1 &
    rlhf_pid=$!
    status=0
    wait "$rlaif_pid" || { status=$?; echo "RLAIF branch failed; end of $runs/logs/rlaif.log:"; tail -n 30 "$runs/logs/rlaif.log"; }
    wait "$rlhf_pid" || { status=$?; echo "RLHF branch failed; end of $runs/logs/rlhf.log:"; tail -n 30 "$runs/logs/rlhf.log"; }
    [[ $status == 0 ]] || exit "$status"
else
    rlaif "$@"
    rlhf "$@"
fi

variant_flags() {  # the train_ppo.py flags of one ALGOS entry
    case "$1" in
        reinforce|rloo|grpo|reinforce++|dr-grpo) echo "--algo $1" ;;
        direct) echo "--reward direct --algo rloo" ;;
        *) echo "ALGOS: unknown variant '$1' (reinforce, rloo, grpo, reinforce++, dr-grpo or direct)" >&2; return 1 ;;
    esac
}
for variant in ${ALGOS:-}; do
    flags="$(variant_flags "$variant")"
    # shellcheck disable=SC2086  # the flags are words
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" stage "variant/$variant" "$launch" train_ppo.py $flags \
        --out-dir "$runs/$variant" "$@"
done

stage "7/7 evaluation" "$python" evaluate.py "$@"
echo "=== pipeline finished in $((SECONDS - start)) s; report: $runs/eval/report.md"
