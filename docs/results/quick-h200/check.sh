#!/usr/bin/env bash
# GPU check for vitcompress: install carried wheels, then bench, quick study, test suite on CUDA.
set -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
(cd /tmp && python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site "$OLDPWD/.whl/diffq-0.2.4.tar.gz") > $OUT/diffq-build.log 2>&1 || echo "diffq build failed (see diffq-build.log)"
export PYTHONPATH=/tmp/site:$PWD/src
mkdir -p /usr/share/datasets/fashion-mnist && cp .fmnist/* /usr/share/datasets/fashion-mnist/
nvidia-smi -L; python3 -c "import torch,timm,onnxruntime,accelerate;print('torch',torch.__version__,'cuda',torch.cuda.is_available(),torch.cuda.get_device_name(0),'timm',timm.__version__,'ort',onnxruntime.__version__,'accelerate',accelerate.__version__)"
python3 -c "import diffq" 2>/dev/null && echo "diffq: ok" || echo "diffq: missing"
el "bench"
for a in d8e8d16ccfbc 71543ebca905 5ff977f765b0 f91db69616ac; do
  timeout 35 python3 -m vitcompress bench .gpuart/$a --device auto --threads 2 --runtimes torch-eager --batch-sizes 1,16,256 --no-progress 2>&1 | tail -12
done > $OUT/bench.log 2>&1; tail -30 $OUT/bench.log
el "quick study"
RECIPE=quick
python3 -c "import diffq" 2>/dev/null || { python3 - <<'PY'
import yaml, importlib.resources as r
d = yaml.safe_load((r.files('vitcompress') / 'recipes' / 'quick.yaml').read_text())
d['experiments'] = [e for e in d['experiments'] if 'qat.diffq' not in e['steps'][0]]
yaml.safe_dump(d, open('/tmp/quick-nodiffq.yaml', 'w'), sort_keys=False, allow_unicode=True)
PY
RECIPE=/tmp/quick-nodiffq.yaml; }
timeout 240 python3 -m vitcompress study $RECIPE --out /tmp/q --no-progress > $OUT/study.log 2>&1; echo "study rc=$?"
tail -40 $OUT/study.log
python3 -m vitcompress report /tmp/q > /dev/null 2>&1
cp /tmp/q/report.md $OUT/quick-report.md 2>/dev/null; cp /tmp/q/results.jsonl $OUT/quick-results.jsonl 2>/dev/null
el "pytest"
timeout 170 python3 -m pytest -q -n 6 -p no:cacheprovider --timeout 150 --maxfail=40 tests > $OUT/pytest.log 2>&1; echo "pytest rc=$?"
grep -E "passed|failed|FAILED|ERROR" $OUT/pytest.log | tail -40
el "done"
