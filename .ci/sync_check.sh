#!/usr/bin/env bash
# Fails when nbdev_clean or nbdev_export would change tracked or untracked files under nbs/ or concept_nb/.
set -euo pipefail
BIN=${1:-.venv/bin}
snap() { { git diff HEAD -- nbs concept_nb; git ls-files --others --exclude-standard nbs concept_nb | sort | xargs -r sha1sum; } | sha1sum; }
before=$(snap)
"$BIN/nbdev_clean"
after_clean=$(snap)
if [ "$before" != "$after_clean" ]; then
  echo "nbdev_clean changed notebooks: run 'nbdev_clean' and commit the result." >&2
  git status --short nbs >&2; exit 1
fi
"$BIN/nbdev_export"
after_export=$(snap)
if [ "$before" != "$after_export" ]; then
  echo "Notebooks and library are not in sync: run 'nbdev_export' and commit concept_nb/." >&2
  git status --short concept_nb >&2; exit 1
fi
echo "notebooks clean, library in sync"
