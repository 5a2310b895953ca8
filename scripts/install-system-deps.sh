#!/usr/bin/env bash
# Installs the Debian packages aem's benchmarks, browser and fuzz tests use.
# Idempotent: does nothing when everything is present. Needs root (or sudo).
set -euo pipefail
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# clang: builds the HTTP head parser with libFuzzer coverage for the atheris fuzz test
command -v clang >/dev/null 2>&1 || need+=(clang)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# nginx-light starts a system service on install; aem's benchmarks run their own.
if command -v service >/dev/null 2>&1; then $SUDO service nginx stop >/dev/null 2>&1 || true; fi
