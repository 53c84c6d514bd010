#!/usr/bin/env bash
# Installs (from Debian's packages) Chromium and ChromeDriver for the console's browser tests
# (tests/relay/console_browser.rs), and exports where they are:
#   RELAY_TEST_CHROMEDRIVER=/usr/bin/chromedriver   (build.rs then turns on cfg(browser_tests):
#                                                    without it those tests are ignored)
#   RELAY_TEST_CHROMIUM=/usr/bin/chromium
# Idempotent and quiet: nothing is installed when both are there. Use either way:
#   source .ci/browser.sh             # exports the variables into this shell
#   eval "$(bash .ci/browser.sh)"     # the same, from its only output on stdout
# Progress goes to stderr.

_relay_browser_setup() (
    set -euo pipefail
    log() { echo "browser.sh: $*" >&2; }
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        log "installing chromium and chromium-driver"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq chromium chromium-driver >&2
    fi
    # Both come from one source package: a driver of another version refuses the browser.
    log "ready: $(/usr/bin/chromedriver --version | head -n 1)"
)

if _relay_browser_setup; then
    export RELAY_TEST_CHROMEDRIVER=/usr/bin/chromedriver
    export RELAY_TEST_CHROMIUM=/usr/bin/chromium
    unset -f _relay_browser_setup
    echo "export RELAY_TEST_CHROMEDRIVER=$RELAY_TEST_CHROMEDRIVER" \
        "RELAY_TEST_CHROMIUM=$RELAY_TEST_CHROMIUM"
else
    echo "browser.sh: could not install Chromium and ChromeDriver" >&2
    unset -f _relay_browser_setup
    return 1 2>/dev/null || exit 1
fi
