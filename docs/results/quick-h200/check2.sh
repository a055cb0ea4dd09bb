#!/usr/bin/env bash
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
(cd /tmp && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site "$OLDPWD/.whl/diffq-0.2.4.tar.gz") >/dev/null 2>&1 || echo "diffq build failed"
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/* /usr/share/datasets/fashion-mnist/
el "gates study"
timeout 75 python3 -m vitcompress --debug study .gpuart/gates.yaml --out /tmp/g --no-progress > $OUT/gates.log 2>&1; echo "study rc=$?"
grep -E "top1|FAILED|Error" $OUT/gates.log | tail -8
el "pytest"
timeout 185 python3 -m pytest -q -n 12 -p no:cacheprovider --timeout 120 -rfE --tb=short tests > $OUT/pytest.log 2>&1; echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" $OUT/pytest.log | cut -c1-300 | tail -40
el "done"
