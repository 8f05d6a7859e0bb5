#!/usr/bin/env bash
# The study's wire-format runs (reports/README.md): a comparison's best baseline sent as fp16, int8 and
# top-1% with error feedback, and FeDEQ as int8, each with the comparison's tuned settings and seeds,
# into the comparison's own experiment, so its report shows them as rows beside the fp32 ones
# (`fedrep@int8`); then the report and the export again. Run after scripts/study.sh NAME.
#
#   bash scripts/study_wire.sh fmnist-dir0.3 knnper
set -euo pipefail
NAME=${1:?usage: bash scripts/study_wire.sh NAME METHOD}
METHOD=${2:?usage: bash scripts/study_wire.sh NAME METHOD}
source scripts/study_env.sh
run --methods "$METHOD" --wire fp16
run --methods "$METHOD" --wire int8
run --methods "$METHOD" --wire topk --wire-topk 0.01 --wire-feedback
run --methods fedeq --wire int8
report
