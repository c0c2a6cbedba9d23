#!/usr/bin/env bash
# Print one AWS Secrets Manager secret (its SecretString) for cluster.yaml's commands:
#   NAME=$(bash aws/secret.sh SECRET_ID) && export NAME
# Every secret a node reads goes through here so that none can arrive empty: a node whose
# instance profile may not read it (Ray gives its own default role to the head only), a missing
# secret or an empty one stops the command with a one-line reason on stderr, instead of the
# service starting with an empty key. The value goes to stdout only, never to a log.
set -euo pipefail
id=${1:?usage: bash aws/secret.sh SECRET_ID}
if ! value=$(aws secretsmanager get-secret-value --secret-id "$id" --query SecretString --output text); then
  echo "aws/secret.sh: cannot read secret $id (does this node's instance profile allow secretsmanager:GetSecretValue on it? see aws/README.md)" >&2
  exit 1
fi
if [ -z "$value" ] || [ "$value" = None ]; then  # `--output text` prints None for a secret without a SecretString
  echo "aws/secret.sh: secret $id is empty" >&2
  exit 1
fi
printf '%s' "$value"
