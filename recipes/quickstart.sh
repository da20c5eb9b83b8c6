#!/usr/bin/env bash
# The quickstart chain on the bundled Fashion-MNIST subset, one subcommand per stage.
# Usage: bash recipes/quickstart.sh [extra arguments passed to every stage, e.g. --set seed=1]
set -euo pipefail
recipe="$(dirname "$0")/quickstart.yaml"

wartok prepare "$recipe" "$@"
wartok pretrain-tokenizer "$recipe" "$@"
wartok train-prior "$recipe" "$@"
wartok train-wartok "$recipe" "$@"
