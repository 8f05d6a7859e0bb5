#!/usr/bin/env bash
# The study's edge-device runs (reports/README.md): a comparison's every method, with its tuned
# settings and seeds, on the mobile-like fleet (bench/loop/device_sets/mobile-mix.toml, docs/devices.md),
# recorded in the comparison's store as the experiment study-NAME-LABEL and reported in
# reports/NAME-LABEL/: accuracy against simulated time, the simulated seconds to the target and each
# method's participation. Further arguments go to bench.run (a deadline: --round-deadline 2).
# Run after scripts/study.sh NAME.
#
#   bash scripts/study_devices.sh fmnist-dir0.3 mobile
#   bash scripts/study_devices.sh fmnist-dir0.3 mobile-2s --round-deadline 2
set -euo pipefail
NAME=${1:?usage: bash scripts/study_devices.sh NAME LABEL [bench.run options]}
LABEL=${2:?usage: bash scripts/study_devices.sh NAME LABEL [bench.run options]}
shift 2
source scripts/study_env.sh
EXP=study-$NAME-$LABEL
REPORT=reports/$NAME-$LABEL
mkdir -p "$REPORT"
run --devices mobile-mix "$@"
report
