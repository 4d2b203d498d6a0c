#!/usr/bin/env bash
# Follow the component logs of a run in tmux panes: rl, inference server(s), orchestrator, trainer ranks.
# Usage: scripts/tmux.sh [run_dir]   (default: the newest run under outputs/)
set -euo pipefail
cd "$(dirname "$0")/.."

run_dir="${1:-}"
if [[ -z "$run_dir" ]]; then
  run_dir="$(find outputs -mindepth 1 -maxdepth 4 -name config.yaml -not -path '*/.hydra/*' -printf '%T@ %h\n' 2>/dev/null \
    | sort -n | tail -1 | cut -d' ' -f2-)"
fi
if [[ -z "$run_dir" || ! -d "$run_dir/logs" ]]; then
  echo "no run directory found (give one: scripts/tmux.sh outputs/<date>/<time>)" >&2
  exit 1
fi
command -v tmux >/dev/null || { echo "tmux is not installed" >&2; exit 1; }

session="rlrun-$(basename "$(dirname "$run_dir")")-$(basename "$run_dir")"
follow() { echo "tail -n 200 -F '$run_dir/logs/$1'"; }

tmux new-session -d -s "$session" -n logs "$(follow rl.log)"
tmux split-window -t "$session" -v "$(follow orchestrator.log)"
tmux split-window -t "$session" -h "$(follow trainer/rank_0.log)"
tmux select-pane -t "$session:0.0"
servers=("$run_dir"/logs/inference*.stdout)  # inference.stdout, or inference_<k>.stdout with several servers
first="$(basename "${servers[0]}")"
tmux split-window -t "$session" -h "$(follow "$first")"
for server_log in "${servers[@]:1}"; do
  [[ -e "$server_log" ]] || continue
  server="$(basename "$server_log")"
  tmux new-window -t "$session" -n "${server%.stdout}" "$(follow "$server")"
done
for rank_log in "$run_dir"/logs/trainer/rank_*.log; do
  rank="$(basename "$rank_log")"
  [[ "$rank" == rank_0.log || ! -e "$rank_log" ]] && continue
  tmux new-window -t "$session" -n "${rank%.log}" "$(follow "trainer/$rank")"
done
tmux select-layout -t "$session:0" tiled
exec tmux attach -t "$session"
