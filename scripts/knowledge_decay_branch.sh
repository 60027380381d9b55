#!/usr/bin/env bash
# A decayed branch of a knowledge-sweep checkpoint, then its recall (issue 21's probe of the
# constant learning rate). The sweep trains every arm at a constant LR after warmup, so that each
# checkpoint *is* the shorter run; a run at a constant LR holds its weights in a noise band, below
# what the same run would store with its LR annealed. A branch (the warmup-stable-decay recipe,
# Hägele et al. 2024, arXiv:2405.18392) starts from the checkpoint's weights (`init_from`: a fresh
# AdamW, 20 warmup steps) and trains COOL_STEPS more steps on the same biographies with the LR
# cosine-decayed to 0; its recall is then scored on the run's questions.
#
# The sweep now trains such branches of every run itself (`python -m pkmlm.knowledge.sweep ... --decay
# 1,2`, src/pkmlm/knowledge/decay.py: the same recipe); this script is the probe that found the
# effect (docs/results/knowledge_decay_probe.json), kept to reproduce it and to branch one checkpoint.
#
#   bash scripts/knowledge_decay_branch.sh RUN_DIR STEP COOL_STEPS OUT_DIR [FACTS_DIR]
#
# RUN_DIR: a sweep run (its .hydra/overrides.yaml gives the arm's experiment, model overrides,
# data, tokenizer and seed); STEP: its checkpoint step; COOL_STEPS: the branch's steps (the sweep's
# equal-exposure steps / 4 = 40 exposures); OUT_DIR: the branch's run directory (written, then
# its recall in OUT_DIR.recall.json); FACTS_DIR: where qa.jsonl is (default: beside the run's
# bios.jsonl). One thread, nice 10: it runs beside a sweep.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 RUN_DIR STEP COOL_STEPS OUT_DIR [FACTS_DIR]" >&2; exit 2; }
run=$1 step=$2 cool=$3 out=$4
overrides="$run/.hydra/overrides.yaml"
ckpt="$run/checkpoints/step_$(printf %08d "$step").dcp"
[ -f "$overrides" ] || { echo "$run: no .hydra/overrides.yaml; give a run directory of the knowledge sweep" >&2; exit 2; }
[ -d "$ckpt" ] || { echo "$ckpt: no such checkpoint; give a step that $run/checkpoints holds" >&2; exit 2; }
[[ "$cool" =~ ^[1-9][0-9]*$ ]] || { echo "COOL_STEPS $cool: give a positive number of steps" >&2; exit 2; }
# The arm as the sweep trained it: experiment, model overrides, data, tokenizer and seed; not its
# length, checkpointing, logging or run directory, which the branch sets.
mapfile -t keep < <(sed -n 's/^- //p' "$overrides" | grep -E '^(experiment|model\.|data\.|seed)=?' || true)
bios=$(printf '%s\n' "${keep[@]}" | sed -n 's/^data\.files=\[\(.*\)\]$/\1/p')
facts=${5:-$(dirname "$bios")}
[ -f "$facts/qa.jsonl" ] || { echo "$facts: no qa.jsonl; give the run's facts directory as FACTS_DIR" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -d "$out/checkpoints/step_$(printf %08d "$cool").dcp" ]; then
  OMP_NUM_THREADS=1 nice -n 10 "$root/.venv/bin/pkmlm-train" "${keep[@]}" "init_from=$ckpt" optim.schedule=cosine \
    optim.warmup_steps=20 optim.min_lr_ratio=0.0 "train.max_steps=$cool" "checkpoint.interval=$cool" \
    "logging.interval=$cool" logging.progress=false logging.wandb.mode=disabled "hydra.run.dir=$out"
fi
OMP_NUM_THREADS=1 nice -n 10 "$root/.venv/bin/pkmlm-eval" "checkpoint=$out/checkpoints/step_$(printf %08d "$cool").dcp" \
  "eval.recall=$facts/qa.jsonl" > "$out.recall.json"
echo "$out: $(grep -o '"recall/bits": [0-9.]*' "$out.recall.json")"
