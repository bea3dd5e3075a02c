#!/bin/sh
# Validate the OpenAPI document with openapi-spec-validator from PyPI, in a throwaway venv.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${OPENAPI_VENV:-${TMPDIR:-/tmp}/ism-openapi-venv}
if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "openapi-spec-validator>=0.7,<0.8"
fi
"$venv/bin/openapi-spec-validator" "$here/openapi/ism-vmm.yaml"
