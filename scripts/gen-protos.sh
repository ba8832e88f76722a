#!/usr/bin/env bash
# Regenerate the gRPC/protobuf modules in afsd/api from the .proto files next to them.
# The generated code is committed (a fresh clone needs no build step); a test checks it is current.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-.}
"$PY" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" afsd/api/*.proto
