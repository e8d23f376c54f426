#!/usr/bin/env bash
# The README's main command: install everything, make the demo data, train the tiny Audex model through
# stage0_text -> stage1 -> stage2 -> stage3 on the CPU, then print what it learned on held-out data
# (ASR WER, TTS/TTA codec-token accuracy against an unconditional baseline, audio QA) and the per-stage
# text-regression report. Measured 2026-12-07 on 2 CPU cores: 10.5-11 minutes on an idle host (three fresh runs; README).
#
#   bash scripts/run_demo.sh            # rerun: finished stages are kept, a killed stage resumes
#   bash scripts/run_demo.sh --fresh    # start over (deletes demo_data/ and runs/demo/)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)

if [ "${1:-}" = "--fresh" ]; then
  rm -rf demo_data runs/demo
fi

bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export PYTHONWARNINGS=ignore

# The demo's tiny model listens through 3 s windows (its clips last 1.6-3 s); conf/demo_chain.yaml says the same.
if [ ! -f demo_data/stats.json ]; then
  python scripts/make_demo_data.py --out demo_data --model-override audio_encoder.window_seconds=3.0 --tta-seconds 2
fi
DATA_DONE=$(date +%s)

python examples/audex_train_chain.py --config-name=demo_chain
TRAIN_DONE=$(date +%s)

python scripts/demo_report.py --data demo_data --runs runs/demo --tta-num-frames 50
END=$(date +%s)
echo "demo wall time: $((END - START)) s (setup + data $((DATA_DONE - START)) s, training $((TRAIN_DONE - DATA_DONE)) s, report $((END - TRAIN_DONE)) s)"
