#!/usr/bin/env bash
# Regenerates docs/tensorboard.png: a real TensorBoard on a real demo run, in headless Chromium.
#   bash docs/screenshot.sh [run_dir]        (default runs/screenshot; reused when it holds a finished run)
# Needs: the project's .venv, and Chromium (Debian: apt-get install -y chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/screenshot}
PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-6123}
CHROMIUM=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$CHROMIUM" ] || { echo "error: no chromium on PATH; install it (Debian: apt-get install -y chromium)" >&2; exit 1; }

# 1. A shortened demo run (one epoch of configs/smoke.yaml), unless one is there already.
if [ ! -f "$RUN/checkpoints/last.ckpt" ]; then
    "$PYTHON" -m xception_pl fit --config configs/smoke.yaml --trainer.max_epochs 1 \
        --trainer.default_root_dir "$RUN" --trainer.log_every_n_steps 2
fi

# 2. TensorBoard on 127.0.0.1 only, stopped whatever happens next.
TMP=$(mktemp -d)
"$PYTHON" -m tensorboard.main --logdir "$RUN" --host 127.0.0.1 --port "$PORT" > "$TMP/tensorboard.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$PORT/data/runs" > /dev/null && break || sleep 1
done

# 3. The scalars and the images dashboards, side by side in one picture.
shoot() {  # width, dashboard and tag filter, output png
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$1,1000" \
        --virtual-time-budget=20000 --user-data-dir="$TMP/profile" --screenshot="$3" \
        "http://127.0.0.1:$PORT/?darkMode=false#$2" > /dev/null 2>&1
}
shoot 960 "scalars&tagFilter=train/loss|train/lr|val/acc1" "$TMP/scalars.png"
shoot 1300 "images&tagFilter=images/" "$TMP/images.png"
"$PYTHON" - "$TMP/scalars.png" "$TMP/images.png" docs/tensorboard.png <<'EOF'
import sys
from PIL import Image
left, right = Image.open(sys.argv[1]), Image.open(sys.argv[2])
both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
both.paste(left, (0, 0))
both.paste(right, (left.width, 0))
both.save(sys.argv[3], optimize=True)
EOF
echo "wrote docs/tensorboard.png from $RUN"
