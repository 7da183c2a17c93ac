#!/usr/bin/env bash
# Installs the Debian packages the test suite and the benchmarks need, when they are missing:
# qemu (the emulation agent's real emulator), libfaketime (a clock step under a running
# broker: tests/test_clock.py) and the peers the benchmark compares against.
# Needs root (or passwordless sudo); without either it says what is missing and carries on,
# and the tests that need those programs skip with the reason.
set -u
wanted=(qemu-system-x86 qemu-utils beanstalkd redis-server faketime)
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-debian-deps: no apt-get; missing: ${missing[*]}" >&2
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
echo "install-debian-deps: installing ${missing[*]}"
$sudo apt-get update -qq >/dev/null && \
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "install-debian-deps: could not install ${missing[*]}" >&2
exit 0
