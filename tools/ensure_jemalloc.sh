#!/usr/bin/env bash
# Install Debian's libjemalloc2 when missing (Odyssey preloads it: steadier, smaller peak memory).
# Never fails the build: without apt or root it prints why and Odyssey uses glibc malloc.
ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libjemalloc2 >/dev/null 2>&1; }) \
    && echo "installed libjemalloc2" && exit 0
fi
echo "note: libjemalloc2 not installed (no apt or not root); Odyssey falls back to glibc malloc"
exit 0
