#!/usr/bin/env bash
# The study's edge-device runs (reports/README.md): a comparison's every method, with its tuned
# settings and seeds, on the mobile-like fleet (bench/loop/device_sets/mobile-mix.toml, docs/devices.md),
# into the comparison's own experiment: its report shows the fleet's runs as a section of their own
# (devices=mobile-mix), with accuracy against simulated time, the simulated seconds to the target and
# each method's participation; then the report and the export again. Run after scripts/study.sh NAME.
# Further arguments go to bench.run (a deadline: --round-deadline 5).
#
#   bash scripts/study_devices.sh fmnist-dir0.3
set -euo pipefail
NAME=${1:?usage: bash scripts/study_devices.sh NAME [bench.run options]}
shift
source scripts/study_env.sh
run --devices mobile-mix "$@"
report
