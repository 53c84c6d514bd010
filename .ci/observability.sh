#!/usr/bin/env bash
# Checks deploy/observability/: the alert rules parse and pass their unit tests (promtool), and
# the dashboard is valid JSON whose queries parse and name only metrics the relay exports
# (.ci/check-observability.py). Installs promtool from Debian's `prometheus` package when it is
# missing (idempotent, quiet).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
    # The package also holds the Prometheus server, whose service would start on port 9090:
    # a policy-rc.d answering 101 keeps it stopped (unless one exists already).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus >/dev/null
fi
python3 -c 'import yaml' 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check pyyaml

promtool check rules deploy/observability/alerts.yml
promtool test rules deploy/observability/alerts.test.yml
python3 -m json.tool deploy/observability/grafana-dashboard.json >/dev/null
python3 .ci/check-observability.py
