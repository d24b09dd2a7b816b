#!/usr/bin/env bash
# Validate the Kubernetes manifest offline: no cluster, no network.
#
#   bash chapters/06_distributed_training/launch/validate_k8s.sh [-k VERSION]... [MANIFEST...]
#   bash chapters/06_distributed_training/launch/validate_k8s.sh --self-test
#
# The tool: the pip package kubernetes-validate (pinned in requirements.txt), which
# ships the OpenAPI JSON schemas of every Kubernetes release since 1.25, so it needs
# no cluster. Its own command line, for one version:
#     kubernetes-validate --strict -k 1.31.0 chapters/06_distributed_training/launch/k8s/train-job.yaml
# (--strict: unknown fields, i.e. typos, are errors). `kubectl apply --dry-run=client`
# is NOT offline: it downloads the schema from a cluster's API server.
#
# This script runs that CLI once, then k8s/check_manifest.py, which checks the schemas
# of several versions (default 1.27.0 1.31.0 1.37.0) and what no schema can see
# (Service <-> pod subdomain and labels, RDZV_HOST, completions = parallelism = NNODES,
# ...). --self-test also feeds it broken copies of the manifest, each of which must fail.
#
# Environment: PYTHON (an interpreter with kubernetes-validate; default: the repo's
# .venv, else python3).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../../.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
if ! "$PY" -c 'import kubernetes_validate' 2>/dev/null; then
  echo "validate_k8s: $PY has no kubernetes-validate; pip install kubernetes-validate==1.37.0" >&2
  exit 2
fi

if [[ "${1:-}" != "--self-test" ]]; then
  files=(); for a in "$@"; do [[ "$a" == -* || "$a" =~ ^[0-9.]+$ ]] || files+=("$a"); done
  [[ ${#files[@]} -gt 0 ]] || files=("$HERE/k8s/train-job.yaml")
  KV="$(dirname "$PY")/kubernetes-validate"
  if [[ -x "$KV" ]]; then
    echo "\$ kubernetes-validate --strict -k 1.31.0 ${files[*]}"
    out="$("$KV" --strict -k 1.31.0 "${files[@]}" 2>&1)" || { echo "$out"; exit 1; }
    echo "$out"
    if grep -q '^WARN' <<<"$out"; then echo "validate_k8s: warnings count as failures" >&2; exit 1; fi
  fi
fi
exec "$PY" "$HERE/k8s/check_manifest.py" "$@"
