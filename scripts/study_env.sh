# Sourced by scripts/study_wire.sh and scripts/study_devices.sh: one comparison's files and the two
# commands every follow-up run of the study uses. Expects NAME; run from the repository root. EXP (the
# experiment) and REPORT (the report's folder) default to the comparison's own; set them after
# sourcing to record and report apart.
PY=${PY:-python}
CFG=configs/study/$NAME.toml
TUNED=configs/tuned/study-$NAME.toml
OUT=reports/$NAME
STORE=sqlite:///$OUT/mlflow.db
EXP=study-$NAME
REPORT=$OUT
[ -f "$TUNED" ] || { echo "error: no $TUNED; run bash scripts/study.sh $NAME first" >&2; exit 2; }
# A run with the comparison's config and tuned settings, into EXP.
run() {
  $PY -m bench.run --config "$CFG" --config "$TUNED" --tracking-uri "$STORE" --experiment "$EXP" --workers 2 \
    --quiet --no-report --keep-going "$@"
}
# EXP's report in REPORT (plotly.js once, in reports/) and the runs it reads, exported beside it.
report() {
  $PY -m bench.report --tracking-uri "$STORE" --experiment "$EXP" --out "$REPORT" --shared-plotly
  $PY scripts/export_runs.py "$STORE" "$EXP" > "$REPORT/runs.json"
}
