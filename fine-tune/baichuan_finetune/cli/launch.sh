#!/usr/bin/env bash
# Launch fine-tune/fine-tune.py with DeepSpeed on one node or on the nodes of a hostfile.
#
#   scripts/train.sh [launcher options] [fine-tune.py options]
#
# Launcher options (everything else goes to fine-tune.py unchanged):
#   --hostfile FILE     nodes as "hostname slots=N" lines (# comments and blank lines allowed);
#                       without it: this node, all local GPUs (or --num_gpus)
#   --num_gpus N        processes on this node (single node only)
#   --master_addr ADDR  rendezvous address (default: 127.0.0.1, or the hostfile's first host)
#   --master_port PORT  rendezvous port (default 29500)
#   --no_ssh            one command per node, no pdsh/ssh: run this script on every node with the
#                       same hostfile, --master_addr and its own --node_rank
#   --node_rank R       this node's line number (0-based, among the hostfile's hosts) with --no_ssh
#   --no_ssh_check      skip the checks that the hostfile's hosts resolve and take passwordless ssh
#                       (made for every host but this machine, even when it is the only one; a
#                       hostfile with only this machine, e.g. "localhost slots=2", runs here)
#   --dry_run           print the command and exit
# Example (the official recipe, 2 nodes):
#   scripts/train.sh --hostfile hostfile --deepspeed ds_config.json --data_path data/x.json ...
set -euo pipefail

# This file is package data (baichuan_finetune/cli/launch.sh): scripts/train.sh and `baichuan-finetune train
# --num_gpus/--hostfile ...` run it, and say through the environment what each rank runs and how to name it:
#   TRAIN_SH_PROG     the command the user ran, for messages (train.sh, train_lora.sh, baichuan-finetune train)
#   TRAIN_SH_SCRIPT   the training script each rank runs (scripts/train.sh: fine-tune/fine-tune.py), or
#   TRAIN_SH_MODULE   the module each rank runs instead (deepspeed --module; the installed console command)
#   TRAIN_SH_VENV     a virtual environment to name when deepspeed is not on PATH (a source checkout's .venv)
#   TRAIN_SH_PYTHON   run DeepSpeed's launcher with this Python (python -m deepspeed.launcher.runner), so that
#                     the ranks run in its environment; without it, the `deepspeed` command on PATH
PROG="${TRAIN_SH_PROG:-train.sh}"
script="${TRAIN_SH_SCRIPT:-}" module="${TRAIN_SH_MODULE:-}" venv="${TRAIN_SH_VENV:-}" python="${TRAIN_SH_PYTHON:-}"
unset TRAIN_SH_PROG TRAIN_SH_SCRIPT TRAIN_SH_MODULE TRAIN_SH_VENV TRAIN_SH_PYTHON
[[ -n "$script" || -n "$module" ]] || { printf '%s: error: %s\n' "$PROG" "TRAIN_SH_SCRIPT or TRAIN_SH_MODULE must say what to run" >&2; exit 2; }

die() { # one clear line, exit 2
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    exit 2
}

hostfile="" num_gpus="" master_addr="" master_port="29500" node_rank="" no_ssh=0 no_ssh_check=0 dry_run=0
passthrough=()
while (($#)); do
    case "$1" in
    --hostfile | --num_gpus | --master_addr | --master_port | --node_rank)
        (($# >= 2)) || die "$1 needs a value"
        name="${1#--}"
        printf -v "$name" '%s' "$2"
        shift 2
        ;;
    --hostfile=* | --num_gpus=* | --master_addr=* | --master_port=* | --node_rank=*)
        name="${1%%=*}"
        name="${name#--}"
        printf -v "$name" '%s' "${1#*=}"
        shift
        ;;
    --no_ssh) no_ssh=1; shift ;;
    --no_ssh_check) no_ssh_check=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) passthrough+=("$1"); shift ;;
    esac
done

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
[[ -z "$num_gpus" ]] || { is_uint "$num_gpus" && ((num_gpus >= 1)); } || die "--num_gpus '$num_gpus': expected a number >= 1"
is_uint "$master_port" && ((master_port >= 1 && master_port <= 65535)) || die "--master_port '$master_port': expected a port 1-65535"
[[ -z "$node_rank" ]] || is_uint "$node_rank" || die "--node_rank '$node_rank': expected a number >= 0"
if [[ -n "$master_addr" && ! "$master_addr" =~ ^[A-Za-z0-9]([A-Za-z0-9._:-]*[A-Za-z0-9])?$ ]]; then
    die "--master_addr '$master_addr': not a hostname or IP address"
fi

hosts=() host_lines=()
if [[ -n "$hostfile" ]]; then
    [[ -f "$hostfile" && -r "$hostfile" ]] || die "--hostfile '$hostfile': no such readable file"
    [[ -z "$num_gpus" ]] || die "--num_gpus cannot be combined with --hostfile (the hostfile's slots= say how many)"
    lineno=0
    while IFS= read -r line || [[ -n "$line" ]]; do
        lineno=$((lineno + 1))
        content="${line%%#*}"
        [[ "$content" =~ ^[[:space:]]*$ ]] && continue
        if [[ ! "$content" =~ ^[[:space:]]*([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)[[:space:]]+slots=([1-9][0-9]*)[[:space:]]*$ ]]; then
            die "hostfile '$hostfile' line $lineno: '$line': expected 'hostname slots=N' (N >= 1; hostname of letters, digits, '.', '-', '_')"
        fi
        host="${BASH_REMATCH[1]}"
        for h in ${hosts[@]+"${hosts[@]}"}; do
            [[ "$h" != "$host" ]] || die "hostfile '$hostfile' line $lineno: host '$host' is listed twice"
        done
        hosts+=("$host")
        host_lines+=("$lineno")
    done <"$hostfile"
    ((${#hosts[@]})) || die "hostfile '$hostfile': no 'hostname slots=N' line"
fi

if ((no_ssh)); then
    [[ -n "$hostfile" ]] || die "--no_ssh needs --hostfile (every node runs this script with the same hostfile)"
    [[ -n "$node_rank" ]] || die "--no_ssh needs --node_rank (this node's 0-based position in the hostfile)"
    ((node_rank < ${#hosts[@]})) || die "--node_rank $node_rank: the hostfile lists ${#hosts[@]} host(s)"
    [[ -n "$master_addr" ]] || die "--no_ssh needs --master_addr (an address of the node with --node_rank 0 that all nodes can reach)"
elif [[ -n "$node_rank" ]]; then
    die "--node_rank only goes with --no_ssh (with ssh, one command launches every node)"
fi

# Whether NAME resolves (DNS or /etc/hosts); an unresolvable rendezvous address makes every rank retry
# its lookup forever. Without getent (not Linux) nothing is checked.
resolves() {
    command -v getent >/dev/null 2>&1 || return 0
    timeout 10 getent ahosts "$1" >/dev/null 2>&1
}

# Whether NAME is this machine: localhost, its hostname, or a name for one of its addresses.
is_this_machine() {
    local name="${1,,}" n addr addrs
    case "$name" in localhost | 127.0.0.1) return 0 ;; esac
    for n in "$(hostname 2>/dev/null)" "$(hostname -s 2>/dev/null)" "$(timeout 5 hostname -f 2>/dev/null)"; do
        [[ -n "$n" && "$name" == "${n,,}" ]] && return 0
    done
    command -v getent >/dev/null 2>&1 || return 1
    addrs=" $(hostname -I 2>/dev/null) "
    for addr in $(timeout 10 getent ahosts "$1" 2>/dev/null | awk '{print $1}' | sort -u); do
        [[ "$addr" == 127.* || "$addr" == ::1 || "$addrs" == *" $addr "* ]] && return 0
    done
    return 1
}

# A hostfile whose only host is this machine runs here without ssh (as DeepSpeed does with one host);
# any other hostfile is a launch over ssh, even with a single host: DeepSpeed would otherwise run the
# ranks here with the remote host as rendezvous address (--force_multi makes it use pdsh).
single_local=0 force_multi=0
if ((${#hosts[@]} == 1 && !no_ssh)); then
    if is_this_machine "${hosts[0]}"; then single_local=1; else force_multi=1; fi
fi

if [[ -n "$hostfile" && -z "$master_addr" ]]; then
    if ((single_local)); then
        master_addr="127.0.0.1"
    else
        case "${hosts[0]}" in
        localhost | 127.0.0.1) master_addr="127.0.0.1" ;;
        *) master_addr="${hosts[0]}" ;;
        esac
    fi
elif [[ -n "$master_addr" ]]; then
    resolves "$master_addr" || die "--master_addr '$master_addr': does not resolve (not in DNS or /etc/hosts); give an address every node can reach"
fi

if ((!no_ssh && !single_local && ${#hosts[@]})); then
    if ((!no_ssh_check)); then
        for i in "${!hosts[@]}"; do  # all names first: cheap, and the likelier mistake
            host="${hosts[i]}" where="hostfile '$hostfile' line ${host_lines[i]}"
            resolves "$host" || die "$where: host '$host' does not resolve (not in DNS or /etc/hosts): fix the name, or skip the host checks with --no_ssh_check"
        done
        for i in "${!hosts[@]}"; do
            host="${hosts[i]}" where="hostfile '$hostfile' line ${host_lines[i]}"
            if ! ssh -o BatchMode=yes -o ConnectTimeout=5 -- "$host" true </dev/null >/dev/null 2>&1; then
                die "$where: cannot ssh to '$host' without a password: run 'ssh-keygen' then 'ssh-copy-id $host' (and accept its host key once), or launch each node with --no_ssh --node_rank R --master_addr ADDR, or skip this check with --no_ssh_check"
            fi
        done
    fi
    command -v pdsh >/dev/null 2>&1 || die "a launch over ssh (a hostfile with hosts other than this machine) needs pdsh (apt-get install pdsh); or run this script on every node with --no_ssh --node_rank R --master_addr ADDR"
fi

if [[ -n "$python" ]]; then cmd=("$python" -m deepspeed.launcher.runner); else cmd=(deepspeed); fi
[[ -z "$hostfile" ]] || cmd+=(--hostfile "$hostfile" --no_ssh_check)
((!force_multi)) || cmd+=(--force_multi)
[[ -z "$num_gpus" ]] || cmd+=(--num_gpus "$num_gpus")
[[ -z "$master_addr" ]] || cmd+=(--master_addr "$master_addr")
cmd+=(--master_port "$master_port")
((!no_ssh)) || cmd+=(--no_ssh --node_rank "$node_rank")
if [[ -n "$module" ]]; then cmd+=(--module "$module"); else cmd+=("$script"); fi
cmd+=(${passthrough[@]+"${passthrough[@]}"})

# Without the environment, bash would only say "deepspeed: command not found" (a dry run needs none).
if ((!dry_run)) && [[ -n "$python" ]]; then
    "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)' 2>/dev/null ||
        die "deepspeed: not installed for $python: pip install deepspeed"
elif ((!dry_run)) && ! command -v deepspeed >/dev/null 2>&1; then
    if [[ -n "$venv" && -x "$venv/bin/deepspeed" ]]; then
        die "deepspeed: not on PATH: activate the environment first (source .venv/bin/activate)"
    fi
    die "deepspeed: not installed: create the environment (bash scripts/setup.sh), then source .venv/bin/activate"
fi

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
((!dry_run)) || exit 0

if ((!no_ssh && (${#hosts[@]} > 1 || force_multi))); then
    # pdsh starts every node's launch.py over ssh, and ssh reports a killed launch.py as a non-zero
    # exit that the runner passes on; ranks on other nodes could not write a status file here anyway.
    exec "${cmd[@]}"
fi

# DeepSpeed's runner exits 0 when this node's launch.py dies by a signal (it checks returncode > 0
# only). The training's local main process writes a status file after the final save
# (baichuan_finetune.training.launch_guard); a run that exits 0 without it did not finish.
run_checked() {
    status_file="$(mktemp "${TMPDIR:-/tmp}/train-sh-status.XXXXXX")"
    trap 'rm -f -- "$status_file"' EXIT
    export BAICHUAN_FINETUNE_STATUS_FILE="$status_file"

    # In the background with TERM/INT/HUP forwarded: a signal to this script stops the runner (and the
    # ranks follow their launcher), where a foreground child would outlive a killed script.
    "${cmd[@]}" <&0 &  # <&0: keep stdin (a background job would get /dev/null)
    runner_pid=$!
    trap 'kill -TERM "$runner_pid" 2>/dev/null || true' TERM INT HUP
    local status finished=0
    while :; do
        if wait "$runner_pid"; then status=0; else status=$?; fi
        # wait returns early (> 128) when a trapped signal arrives; the runner is then still stopping.
        if ((status > 128)) && kill -0 "$runner_pid" 2>/dev/null; then continue; fi
        break
    done

    grep -q '"status": "finished"' "$status_file" 2>/dev/null && finished=1
    if ((status == 0 && !finished)); then
        printf '%s: error: %s\n' "$PROG" "deepspeed exited 0 but the training on this node did not finish (its launch.py or a rank was killed?): this run saved no final output" >&2
        return 1
    fi
    if ((status != 0 && finished)); then
        printf '%s: note: the run had finished and saved its output before deepspeed exited %d\n' "$PROG" "$status" >&2
    fi
    return "$status"
}
# On one line: bash has read everything it will run before training starts, so editing this file
# during a run (a git pull, say) cannot change what the running script does next.
run_checked; exit $?
