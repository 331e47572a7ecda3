#!/usr/bin/env bash
# Validates the Kubernetes base in deploy/k8s: renders it, checks every object against the
# Kubernetes and KEDA schemas and the fleet's invariants, then runs check.py's self-test
# (broken copies of the base that must be refused). Exit status 0 when all of that holds.
#
# Needs only python3 (3.11 or later) and pip, with PyPI reachable the first time: the pinned
# requirements go into a virtual environment under $XDG_CACHE_HOME (default ~/.cache),
# reused while requirements.txt is unchanged. Set AGENTFLEET_K8S_CHECK_VENV to use another
# directory. Extra arguments go to check.py.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}

if ! command -v "$python" >/dev/null 2>&1; then
    echo "check.sh: $python not found; install it (apt-get install python3 python3-pip)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "check.sh: check.py needs Python 3.11 or later (tomllib); $python is $("$python" --version 2>&1)" >&2
    exit 1
fi

stamp=$(sha256sum "$here/requirements.txt" | cut -c1-16)
default_cache=${XDG_CACHE_HOME:-${HOME:-/nonexistent}/.cache}
if ! mkdir -p "$default_cache" 2>/dev/null; then
    default_cache=$(mktemp -d "${TMPDIR:-/tmp}/agentfleet-k8s-check.XXXXXX")
fi
venv=${AGENTFLEET_K8S_CHECK_VENV:-$default_cache/agentfleet/k8s-check-$stamp}

if [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    echo "check.sh: installing the pinned requirements into $venv"
    if "$python" -m venv "$venv" >/dev/null 2>&1 && [ -x "$venv/bin/pip" ]; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
            --requirement "$here/requirements.txt"
    else
        # Debian without python3-venv has no ensurepip: a venv without pip, filled by the
        # system's pip (23.0 or later knows --python).
        rm -rf "$venv"
        "$python" -m venv --without-pip "$venv"
        "$python" -m pip --python "$venv/bin/python" install --quiet --disable-pip-version-check \
            --no-input --requirement "$here/requirements.txt"
    fi
    touch "$venv/.installed"
fi

exec "$venv/bin/python" "$here/check.py" --self-test "$@"
