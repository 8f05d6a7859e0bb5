#!/usr/bin/env bash
# The study's Synthetic(1,1) comparison, end to end (reports/README.md): equal sweeps of every method's
# learning rate and main hyperparameter, then 3 seeds of every method with the winners, then the
# report. Resumable: rerun the script after an interruption and each step continues where it stopped
# (Optuna studies add only their missing trials; bench.run --resume continues the comparison).
# Run from the repository root with the project's venv active (or PY=.venv/bin/python). Sweeps: about 35
# minutes on 2 cores; the comparison: about 20.
set -euo pipefail
PY=${PY:-python}
CFG=configs/study/synthetic.toml
TUNED=configs/tuned/study-synthetic.toml
STORE=sqlite:///reports/synthetic/mlflow.db
mkdir -p reports/synthetic
# Equal tuning budget: 8 trials per method at a quarter of the rounds (10), two trials at a time.
declare -A PARAMS=(
  [fedeq]=lr,rho [fedavg]=lr [fedavg_ft]=lr [fedper]=lr [fedrep]=lr,head_epochs [ditto]=lr,lam
  [knnper]=lr,mix [local]=lr [apfl]=lr,alpha [fedbabu]=lr,finetune_epochs [fedprox]=lr,mu
  [fedrod]=lr,generic_loss [lg_fedavg]=lr,global_layers [pfedme]=personal_lr,lam)
for m in fedeq fedavg fedavg_ft fedper fedrep ditto knnper local apfl fedbabu fedprox fedrod lg_fedavg pfedme; do
  $PY -m bench.sweep --config "$CFG" --method "$m" --params "${PARAMS[$m]}" --trials 8 --rounds 10 --seeds 0 \
    --n-jobs 2 --workers 2 --no-final-test --quiet --tracking-uri "$STORE" --experiment study-synthetic-sweeps \
    --storage sqlite:///reports/synthetic/optuna.db --study-name "study-synthetic-$m" --tuned-out "$TUNED"
done
# The comparison: every method, 3 seeds (configs/study/synthetic.toml), with the sweeps' winners.
# Interrupted, it prints the `--resume PARENT_RUN_ID` command that continues it.
$PY -m bench.run --config "$CFG" --config "$TUNED" --tracking-uri "$STORE" --workers 2 --quiet --no-report
# The report (plotly.js once, in reports/) and the runs it reads, exported beside it.
$PY -m bench.report --tracking-uri "$STORE" --experiment study-synthetic --out reports/synthetic --shared-plotly
$PY scripts/export_runs.py "$STORE" study-synthetic > reports/synthetic/runs.json
