#!/usr/bin/env bash
# Start, resume, pause or save the strong reference run (benchmarks/cifar10_strong.sh) across sessions.
#
#     bash benchmarks/strong_run.sh start    # first thing in a session: resume it in the background
#     bash benchmarks/strong_run.sh pause    # SIGSTOP around your own test runs and benchmarks
#     bash benchmarks/strong_run.sh continue
#     bash benchmarks/strong_run.sh status   # the log's last epochs
#     bash benchmarks/strong_run.sh stop     # end it (to move the pin); `start` resumes at its last backed-up epoch
#     bash benchmarks/strong_run.sh save     # before the session ends: copy its files here to commit
#
# The run executes in a git worktree ($WORKTREE) detached at the commit in model/cifar_stem/RUN_COMMIT,
# so edits and tests in this checkout never touch its code (write a newer commit there only between
# stages, when the next stage needs newer code: `start` then moves the worktree to it); it writes under the worktree's
# model/cifar_stem/, which `start` fills from this checkout's copy and `save` copies back (resume
# state included) for the commit.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKOUT=$(pwd)
WORKTREE=${WORKTREE:-$CHECKOUT/../strong}
PIN_FILE=model/cifar_stem/RUN_COMMIT
LOG=$WORKTREE/cifar10_strong.log
PY=${PY:-$CHECKOUT/.venv/bin/python}

run_pids() { pgrep -f "$WORKTREE/benchmarks/cifar10_strong.sh|train_base_model.py --save_folder=./model/cifar_stem|prune_model.py --root_folder=./model/cifar_stem|knowledge_distillation.py .*model/cifar_stem" || true; }

case "${1:-status}" in
  start)
    mkdir -p model/cifar_stem; [ -f "$PIN_FILE" ] || git rev-parse HEAD > "$PIN_FILE"
    pin=$(cat "$PIN_FILE")
    if [ -n "$(run_pids)" ]; then echo "already running: $(run_pids | tr '\n' ' ')"; exit 0; fi
    fresh=0
    if [ ! -d "$WORKTREE" ]; then git worktree add --detach "$WORKTREE" "$pin"; fresh=1; fi
    if [ "$(git -C "$WORKTREE" rev-parse HEAD)" != "$pin" ]; then
      # A new pin (written between stages, when the next stages need newer code); nothing runs now.
      # The newer commit tracks files the run wrote (untracked in the worktree): set the run's own
      # files aside, move the code, then put them back over the committed copies.
      aside="$WORKTREE/../strong-files-$$"
      mv "$WORKTREE/model/cifar_stem" "$aside"
      git -C "$WORKTREE" checkout --quiet --force --detach "$pin" || { mv "$aside" "$WORKTREE/model/cifar_stem"; echo "cannot move $WORKTREE to $pin" >&2; exit 2; }
      mkdir -p "$WORKTREE/model/cifar_stem"; cp -a "$aside/." "$WORKTREE/model/cifar_stem/"; rm -rf "$aside"
      echo "$WORKTREE moved to $pin"
    fi
    mkdir -p "$WORKTREE/model/cifar_stem"
    if [ "$fresh" = 1 ]; then
      # A new worktree holds the run's files as of the pin commit, stamped now: this checkout's
      # copy (the last save) replaces them whatever their times, and the committed log continues,
      # so `save` never replaces it with one session's part.
      cp -a model/cifar_stem/. "$WORKTREE/model/cifar_stem/"
      # Files the pin commit tracks but the run has since removed (a finished iteration's backup):
      # mirror this checkout's copy, so they neither come back into the run nor into the next save.
      (cd "$WORKTREE/model/cifar_stem" && find . -type f | while read -r f; do
        [ -e "$CHECKOUT/model/cifar_stem/$f" ] || rm -f "$f"; done)
      [ ! -f model/cifar_stem/cifar10_strong.log ] || cp model/cifar_stem/cifar10_strong.log "$LOG"
    else
      cp -a --update model/cifar_stem/. "$WORKTREE/model/cifar_stem/"   # the run's newer files stand
    fi
    (cd "$WORKTREE" && PY="$PY" nohup nice -n 5 bash benchmarks/cifar10_strong.sh >> "$LOG" 2>&1 &)
    echo "started at $pin (log: $LOG; CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))" ;;
  pause) run_pids | xargs -r kill -STOP; echo "paused" ;;
  stop)
    # SIGKILL, as a crash would (it ends paused processes too): every stage resumes from its last
    # backed-up epoch, so stop just after an epoch ends to lose little.
    run_pids | xargs -r kill -KILL; sleep 1; [ -z "$(run_pids)" ] && echo "stopped" || { echo "still running: $(run_pids | tr '\n' ' ')" >&2; exit 1; } ;;
  continue) run_pids | xargs -r kill -CONT; echo "running" ;;
  status) tail -n 5 "$LOG" 2>/dev/null || echo "no log at $LOG"; echo "processes: $(run_pids | tr '\n' ' ')" ;;
  save)
    # Copy while paused, so no file is caught half-written (writes are atomic, but a stage's files
    # change together).
    pids=$(run_pids); [ -z "$pids" ] || kill -STOP $pids
    mkdir -p model/cifar_stem
    # results.md is the checkout's (make figures-strong): the worktree holds only the copy `start` gave it.
    tar -C "$WORKTREE/model/cifar_stem" --exclude='*.bkp' --exclude='.lock' --exclude='.tmp-*' --exclude='./results.md' \
        -cf - . | tar -C model/cifar_stem -xf -
    # Files the run has since removed (a finished fit's backup, an iteration's pruned.h5) go here too;
    # the pin and the checkout's own table stay.
    (cd model/cifar_stem && find . -type f ! -name RUN_COMMIT ! -name results.md) | while read -r file; do
      [ -e "$WORKTREE/model/cifar_stem/$file" ] || rm -f "model/cifar_stem/$file"
    done
    find model/cifar_stem -mindepth 1 -type d -empty -delete
    cp "$LOG" model/cifar_stem/cifar10_strong.log
    [ -z "$pids" ] || kill -CONT $pids
    echo "copied into model/cifar_stem/: commit it" ;;
  *) echo "usage: $0 start|pause|continue|status|stop|save" >&2; exit 2 ;;
esac
