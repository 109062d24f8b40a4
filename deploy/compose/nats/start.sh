#!/bin/sh
# Entry point of the nats container (POSIX sh: the nats image is alpine, without bash). Every password the
# server checks is a compose secret /run/secrets/ONEPOOL_NATS_<USER>_PASSWORD; each is exported under its
# file name for the $VAR references of users.conf / leaf-users.conf, so no password shows in the
# container's configuration (docker inspect). On a worker host (ONEPOOL_NATS_HUB set) it also builds the
# URL of the leaf connection to the main host. Then it runs nats-server with the given arguments.
#
# No pipelines here, hence no pipefail (not POSIX).
set -eu

secrets_dir=${NATS_SECRETS_DIR:-/run/secrets}
found=0
for f in "$secrets_dir"/ONEPOOL_NATS_*_PASSWORD; do
  [ -e "$f" ] || continue
  name=${f##*/}
  value=$(cat "$f")
  # nats-server parses a variable's value as a config value: "true" or "10mb" would not be strings, and
  # "a#b" would end at the '#'. Letters, digits, '-' and '_', starting with a letter, are read as written
  # (and are safe in the leaf URL).
  case $value in
    '' | [!A-Za-z]* | *[!A-Za-z0-9_-]*)
      echo "nats: the password in $f (from $name in .env) must be letters, digits, '-' or '_', starting" \
        "with a letter (gen_workers.py --print-passwords makes such)" >&2
      exit 1
      ;;
  esac
  if [ "${#value}" -lt 16 ]; then
    echo "nats: the password in $f (from $name in .env) is shorter than 16 characters" >&2
    exit 1
  fi
  export "$name=$value"
  found=$((found + 1))
done
if [ "$found" -eq 0 ]; then
  echo "nats: no password secrets in $secrets_dir: set the ONEPOOL_NATS_*_PASSWORD variables in .env" >&2
  exit 1
fi

if [ -n "${ONEPOOL_NATS_HUB:-}" ]; then
  : "${ONEPOOL_NATS_LEAF_USER:?set ONEPOOL_NATS_LEAF_USER (leaf-<this host>) in .env}"
  : "${ONEPOOL_NATS_LEAF_PASSWORD:?set ONEPOOL_NATS_LEAF_PASSWORD in .env}"
  export ONEPOOL_NATS_LEAF_URL="nats-leaf://${ONEPOOL_NATS_LEAF_USER}:${ONEPOOL_NATS_LEAF_PASSWORD}@${ONEPOOL_NATS_HUB}"
fi

exec "${NATS_SERVER_BIN:-nats-server}" "$@"
