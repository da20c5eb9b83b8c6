#!/usr/bin/env bash
# The quickstart chain on the bundled Fashion-MNIST subset, one subcommand per stage: the same
# runs as `wartok pipeline recipes/quickstart.yaml`, written out as a shell script.
# Usage: bash recipes/quickstart.sh [extra arguments passed to every stage, e.g. --set seed=1]
set -euo pipefail
recipe="$(dirname "$0")/quickstart.yaml"

wartok prepare "$recipe" "$@"
wartok pretrain-tokenizer "$recipe" "$@"            # runs/quickstart/tokenizer
wartok train-prior "$recipe" "$@"                   # the target prior: runs/quickstart/prior

# wAR-Tok: the tokenizer trained further with lambda * L_wgf, then a fresh prior on its tokens.
wartok train-wartok "$recipe" "$@"                  # runs/quickstart/wartok
wartok train-prior "$recipe" --set train_prior.tokenizer=wartok "$@"
wartok sample "$recipe" --set sample.prior=prior-wartok --set sample.name=wartok "$@"
wartok evaluate "$recipe" --set evaluate.tokenizer=wartok --set evaluate.samples=samples/wartok \
  --set evaluate.run_name=evaluate-wartok "$@"

# The control: the same number of steps with lambda = 0, then the same prior recipe on its tokens.
wartok train-wartok "$recipe" --set wartok.weight=0 --set wartok.run_name=baseline "$@"
wartok train-prior "$recipe" --set train_prior.tokenizer=baseline "$@"
wartok sample "$recipe" --set sample.prior=prior-baseline --set sample.name=baseline "$@"
wartok evaluate "$recipe" --set evaluate.tokenizer=baseline --set evaluate.samples=samples/baseline \
  --set evaluate.run_name=evaluate-baseline "$@"

wartok compare "$recipe" "$@"                       # prints the table, writes runs/quickstart/comparison.md
