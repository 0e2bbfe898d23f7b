#!/usr/bin/env bash
# Installs what the monitor's window test needs when it is missing: Xvfb (a virtual X display) and
# a font with Hangul glyphs (fonts-nanum). Never fails the build: when apt-get is unavailable or
# the install fails it prints the reason and exits 0, and the window test then skips with it.
#
#   bash tools/ensure_xvfb.sh          # called by `make test`
set -u

have_font() {
    command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list :lang=ko family 2>/dev/null | head -n 1)" ]
}

need=()
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb)
have_font || need+=(fonts-nanum)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_xvfb: missing ${need[*]} and apt-get is not available; install them by hand" >&2
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        echo "ensure_xvfb: missing ${need[*]}; installing needs root (sudo apt-get install ${need[*]})" >&2
        exit 0
    fi
fi

echo "ensure_xvfb: installing ${need[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o DPkg::Lock::Timeout=300 --no-install-recommends)
if ! $sudo apt-get install "${apt_opts[@]}" "${need[@]}" >/tmp/ensure_xvfb.log 2>&1; then
    # The package lists may be missing or stale: refresh once and retry.
    $sudo apt-get update -q -o DPkg::Lock::Timeout=300 >>/tmp/ensure_xvfb.log 2>&1
    if ! $sudo apt-get install "${apt_opts[@]}" "${need[@]}" >>/tmp/ensure_xvfb.log 2>&1; then
        echo "ensure_xvfb: apt-get install ${need[*]} failed (see /tmp/ensure_xvfb.log):" >&2
        tail -n 3 /tmp/ensure_xvfb.log >&2
        exit 0
    fi
fi
command -v fc-cache >/dev/null 2>&1 && fc-cache -f >/dev/null 2>&1
echo "ensure_xvfb: installed ${need[*]}" >&2
exit 0
