#!/usr/bin/env bash
# Prepare the wheel folder that scripts/gpu-check.sh installs on a GPU machine with no network.
#
#   scripts/gpu-wheels.sh WHEELS_DIR          # run where pip reaches PyPI, in redpen's own environment
#
# The GPU image is assumed to hold torch, transformers, peft, accelerate, sentence-transformers and the common
# scientific stack, but not vLLM, TRL or redpen's other dependencies. This downloads, for that image's Python (3.12,
# x86-64 Linux), exactly the versions installed here (the ones redpen is tested with) of what it lacks: TRL and the
# rest of redpen's dependency tree below. No dependencies are resolved there (`--no-deps`): this list is the closure,
# worked out from this environment's package metadata against the image's package list.
# Size matters (the folder may travel with a copy of the working tree, 64 MiB at most): it prints the total.
set -euo pipefail
dest=${1:?usage: scripts/gpu-wheels.sh WHEELS_DIR}
python=${PYTHON:-python3}

# What the GPU image lacks of redpen's dependency tree (redpen's own pyproject dependencies and theirs).
packages=(
  trl datasets dill multiprocess                                   # training
  autogen-agentchat autogen-core jsonref opentelemetry-api         # the SALAM roles
  qdrant-client qdrant-edge-py                                     # the memory
  openai jiter sniffio distro httpx2 httpcore2 truststore          # the openai backend (served engines)
  pydantic pydantic-core annotated-types typing-inspection         # settings and records
  fastapi starlette uvicorn                                        # redpen serve (the served-engine check)
  gguf nltk defusedxml                                             # GGUF conversion; contamination check
)
# Published as a source archive only: built into a wheel here (pure Python, so it installs on any Python 3).
built=(rouge-score)
# Extra names: EXTRA="transformers peft" scripts/gpu-wheels.sh DIR carries this environment's versions of those too.
read -r -a extra <<<"${EXTRA:-}"

pin() {  # NAME==VERSION as installed here
  local version
  version=$("$python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$1") || {
    echo "$1 is not installed in this environment: install redpen here first (pip install -e .)" >&2
    exit 1
  }
  echo "$1==$version"
}
pins=()
for name in "${packages[@]}" "${extra[@]}"; do pins+=("$(pin "$name")"); done
sources=()
for name in "${built[@]}"; do sources+=("$(pin "$name")"); done
mkdir -p "$dest"
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"
"$python" -m pip wheel -q --no-deps -w "$dest" "${sources[@]}"
ls -l "$dest"
du -sh "$dest"
