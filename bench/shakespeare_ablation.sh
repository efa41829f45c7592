#!/usr/bin/env bash
# The CRATE-vs-GPT-2 ablation on Tiny Shakespeare (docs/ablation/shakespeare-char/).
#
# Every configuration at each of its learning rates, SEEDS seeds each, then one
# `wbscale sweep report` over all of them (mean +- std over seeds, each configuration at
# its best LR, compared at equal shape, equal non-embedding parameters and equal FLOPs).
# Run it from the repository root, next to shared/ (the recipes read
# ../shared/data/tinyshakespeare.txt); a clean tree is enough, runs go to $ROOT:
#
#     bash bench/shakespeare_ablation.sh                 # everything (~3 h on 2 cores)
#     ONLY=gpt2,crate bash bench/shakespeare_ablation.sh # some configurations
#     ONLY=gpt2@4e-3 bash bench/shakespeare_ablation.sh  # one configuration at one LR
#     REPORT_ONLY=1 bash bench/shakespeare_ablation.sh   # only re-write the report
#
# JOBS sweeps run side by side, each with nproc/JOBS threads (the numbers in the docs: 2
# cores, JOBS=2, one thread per run). A finished point is skipped on a re-run, so the
# script can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT=${ROOT:-runs/ablation/shakespeare-char}
OUT=${OUT:-docs/ablation/shakespeare-char}
SEEDS=${SEEDS:-3}  # >= 2: a single seed at one LR is a `wbscale fit`, not a sweep
JOBS=${JOBS:-2}
ONLY=${ONLY:-}
WBSCALE=${WBSCALE:-$( [[ -x .venv/bin/wbscale ]] && echo .venv/bin/wbscale || echo wbscale )}
export WANDB_MODE=offline WANDB_SILENT=true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}

# name | recipe | learning rates | recipe overrides (space-separated KEY=VALUE). The larger
# shape comes first: its sweeps are the longest, so the JOBS slots finish together.
L6="model.n_layer=6 model.n_head=6 model.n_embd=144"  # the larger CPU shape: 6 layers, 6 heads, width 144
CONFIGS=(
  "gpt2-6L|shakespeare-char-gpt2|4e-3,2e-3|$L6"
  "crate-6L|shakespeare-char-crate|2e-3|$L6"
  "crate-rope-6L|shakespeare-char-crate|3e-3,2e-3|model.rope=true $L6"
  "crate-rope-alpha-6L|shakespeare-char-crate|3e-3,2e-3|model.rope=true model.ista_residual=true model.ista_decoder=separate $L6"
  "gpt2|shakespeare-char-gpt2|4e-3,8e-3|"
  "gpt2-rope|shakespeare-char-gpt2|4e-3,8e-3|model.rope=true"
  "crate|shakespeare-char-crate|3e-3,2e-3|"
  "crate-rope|shakespeare-char-crate|3e-3,2e-3,4e-3|model.rope=true"
  "crate-rope-alpha|shakespeare-char-crate|3e-3,4e-3|model.rope=true model.ista_residual=true model.ista_decoder=separate"
  "crate-rope-8L|shakespeare-char-crate|2e-3|model.rope=true model.n_layer=8"
)

# ONLY: a comma-separated list of configuration names (every LR) or NAME@LR (one point)
selected() { [[ -z $ONLY ]] || [[ ",$ONLY," == *",$1,"* ]] || [[ ",$ONLY," == *",$1@$2,"* ]]; }

jobs_file=$(mktemp)
trap 'rm -f "$jobs_file"' EXIT
for entry in "${CONFIGS[@]}"; do
  IFS='|' read -r name recipe lrs sets <<<"$entry"
  for lr in ${lrs//,/ }; do
    selected "$name" "$lr" || continue
    args=("$recipe" --lr "$lr" --seeds "$SEEDS" --name "$name-lr$lr" --out "$ROOT/$name/lr$lr" --no-progress)
    for s in $sets; do args+=(--set "$s"); done
    printf '%q ' "$WBSCALE" sweep run "${args[@]}" >>"$jobs_file"
    echo >>"$jobs_file"
  done
done

if [[ -z ${REPORT_ONLY:-} ]]; then
  # one data preparation for all (the recipes share data/shakespeare-char)
  "$WBSCALE" data prepare shakespeare-char-crate
  xargs -P "$JOBS" -I{} bash -c '{}' <"$jobs_file"
fi

# one folder holding every run (links), for one report
all="$ROOT/all"
rm -rf "$all" && mkdir -p "$all"
for run in "$ROOT"/*/lr*/*/; do
  [[ -f $run/recipe.yaml ]] || continue
  config=$(basename "$(dirname "$(dirname "$run")")")
  ln -s "$(cd "$run" && pwd)" "$all/$config-$(basename "$(dirname "$run")")-$(basename "$run")"
done
"$WBSCALE" sweep report "$all" --out "$OUT"
