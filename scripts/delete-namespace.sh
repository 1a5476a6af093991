#!/usr/bin/env bash
# Deletes every queue of namespace $1 on the host's broker (rabbitmqctl), for the scripts that
# run the binaries under a namespace of their own. Never fails: a cleanup must not fail a run.
namespace="${1:?usage: scripts/delete-namespace.sh NAMESPACE}"
rabbitmqctl -q list_queues name 2>/dev/null | grep "^$namespace\." | while read -r q; do
  rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
done || true
