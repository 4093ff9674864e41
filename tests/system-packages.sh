#!/usr/bin/env bash
# Make sure the system programs the tests talk to are installed.
# As root, install what is missing with apt-get; otherwise print the exact
# command to run and stop, so `make test` never fails halfway for a missing server.
set -euo pipefail

# binary -> Debian package
declare -A NEEDED=(
  [redis-server]=redis-server
  [systemd-analyze]=systemd
  [chromium]=chromium
  [mosquitto]=mosquitto
  [mosquitto_pub]=mosquitto-clients
  [ngircd]=ngircd
  [swaks]=swaks
  [dovecot]=dovecot-imapd
  [ip]=iproute2   # tests/test_several_hosts.py: network namespaces, veth links
  [tc]=iproute2   # and netem latency (the kernel's sch_netem)
)

missing=()
for binary in "${!NEEDED[@]}"; do
  # /usr/sbin and /sbin too (ngircd, ip, tc live there), which a normal user's PATH may lack
  PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null 2>&1 || missing+=("${NEEDED[$binary]}")
done
# Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/VERSION/bin (tests/servers.py looks
# there); the ORM tests start their own server from them (tests/test_django_postgres.py).
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || command -v postgres >/dev/null 2>&1 \
  || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)   # ip and tc are one package

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing missing system packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
  echo "The tests need these system packages, which are not installed: ${missing[*]}" >&2
  echo "Install them, then run 'make test' again:" >&2
  echo "    sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
