#!/usr/bin/env bash
# One comparison of the study (reports/README.md), end to end: equal sweeps of every method's learning
# rate and main hyperparameter, then every method with the winners over the config's seeds, then the
# report and the MLflow export beside it.
#
#   bash scripts/study.sh synthetic          # configs/study/synthetic.toml -> reports/synthetic/
#
# Run from the repository root with the project's venv active (or PY=.venv/bin/python). Resumable:
# rerun it after an interruption; Optuna studies add only their missing trials, and an interrupted
# comparison prints the `--resume PARENT_RUN_ID` command that continues it.
set -euo pipefail
NAME=${1:?usage: bash scripts/study.sh NAME (a file configs/study/NAME.toml)}
PY=${PY:-python}
CFG=configs/study/$NAME.toml
TUNED=configs/tuned/study-$NAME.toml
OUT=reports/$NAME
STORE=sqlite:///$OUT/mlflow.db
[ -f "$CFG" ] || { echo "error: no $CFG; the comparisons are: $(ls configs/study | sed 's/\.toml$//' | tr '\n' ' ')" >&2; exit 2; }
mkdir -p "$OUT"
# Equal tuning budget: 8 trials per method at a quarter of the rounds (10), two trials at a time,
# Optuna's median pruner; each method's learning rate and its own main hyperparameter.
declare -A PARAMS=(
  [fedeq]=lr,rho [fedavg]=lr [fedavg_ft]=lr [fedper]=lr [fedrep]=lr,head_epochs [ditto]=lr,lam
  [knnper]=lr,mix [local]=lr [apfl]=lr,alpha [fedbabu]=lr,finetune_epochs [fedprox]=lr,mu
  [fedrod]=lr,generic_loss [lg_fedavg]=lr,global_layers [pfedme]=personal_lr,lam)
for m in fedeq fedavg fedavg_ft fedper fedrep ditto knnper local apfl fedbabu fedprox fedrod lg_fedavg pfedme; do
  $PY -m bench.sweep --config "$CFG" --method "$m" --params "${PARAMS[$m]}" --trials 8 --rounds 10 --seeds 0 \
    --n-jobs 2 --workers 2 --no-final-test --quiet --tracking-uri "$STORE" --experiment "study-$NAME-sweeps" \
    --storage "sqlite:///$OUT/optuna.db" --study-name "study-$NAME-$m" --tuned-out "$TUNED"
done
# The comparison: every method, the config's seeds, with the sweeps' winners layered over the config.
$PY -m bench.run --config "$CFG" --config "$TUNED" --tracking-uri "$STORE" --workers 2 --quiet --no-report --keep-going
# The report (plotly.js once, in reports/) and the runs it reads, exported beside it.
$PY -m bench.report --tracking-uri "$STORE" --experiment "study-$NAME" --out "$OUT" --shared-plotly
$PY scripts/export_runs.py "$STORE" "study-$NAME" > "$OUT/runs.json"
