# Sourced by scripts/study_wire.sh and scripts/study_devices.sh: one comparison's files and the two
# commands every follow-up run of the study uses. Expects NAME; run from the repository root.
PY=${PY:-python}
CFG=configs/study/$NAME.toml
TUNED=configs/tuned/study-$NAME.toml
OUT=reports/$NAME
STORE=sqlite:///$OUT/mlflow.db
[ -f "$TUNED" ] || { echo "error: no $TUNED; run bash scripts/study.sh $NAME first" >&2; exit 2; }
# A run with the comparison's config and tuned settings, into its experiment (its report's groups).
run() { $PY -m bench.run --config "$CFG" --config "$TUNED" --tracking-uri "$STORE" --workers 2 --quiet --no-report --keep-going "$@"; }
# The comparison's report (plotly.js once, in reports/) and the runs it reads, exported beside it.
report() {
  $PY -m bench.report --tracking-uri "$STORE" --experiment "study-$NAME" --out "$OUT" --shared-plotly
  $PY scripts/export_runs.py "$STORE" "study-$NAME" > "$OUT/runs.json"
}
