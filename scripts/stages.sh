# Shared by the scripts that build and study the embedded model; sourced, not run. It moves to the
# repository root, picks the interpreter ($PY, default python3) and defines:
#   stage NAME   true when NAME is listed in $STAGES (run a subset: STAGES="ups lora")
#   todo PATH    true unless PATH exists: a finished stage's output is kept (FORCE=1: run the stage again)
#   resume DIR   prints --resume when DIR holds a run (args.json), so a rerun after a kill continues it
#                instead of refusing the folder
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python3}
stage() { [[ " $STAGES " == *" $1 "* ]]; }
todo() { [ -n "${FORCE:-}" ] || [ ! -e "$1" ]; }
resume() { [ -f "$1/args.json" ] && echo --resume || true; }
