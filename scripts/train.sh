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
#   --no_ssh_check      skip the passwordless-ssh check of the hostfile's hosts
#   --dry_run           print the command and exit
# Example (the official recipe, 2 nodes):
#   scripts/train.sh --hostfile hostfile --deepspeed ds_config.json --data_path data/x.json ...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROG="$(basename "$0")"

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
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
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

hosts=()
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

if [[ -n "$hostfile" && -z "$master_addr" ]]; then
    case "${hosts[0]}" in
    localhost | 127.0.0.1) master_addr="127.0.0.1" ;;
    *) master_addr="${hosts[0]}" ;;
    esac
fi

if ((${#hosts[@]} > 1 && !no_ssh)); then
    if ((!no_ssh_check)); then
        for host in "${hosts[@]}"; do
            if ! ssh -o BatchMode=yes -o ConnectTimeout=5 -- "$host" true </dev/null >/dev/null 2>&1; then
                die "cannot ssh to '$host' without a password: run 'ssh-keygen' then 'ssh-copy-id $host' (and accept its host key once), or launch each node with --no_ssh --node_rank R --master_addr ADDR, or skip this check with --no_ssh_check"
            fi
        done
    fi
    command -v pdsh >/dev/null 2>&1 || die "a multi-node launch with ssh needs pdsh (apt-get install pdsh); or run this script on every node with --no_ssh --node_rank R --master_addr ADDR"
fi

cmd=(deepspeed)
[[ -z "$hostfile" ]] || cmd+=(--hostfile "$hostfile" --no_ssh_check)
[[ -z "$num_gpus" ]] || cmd+=(--num_gpus "$num_gpus")
[[ -z "$master_addr" ]] || cmd+=(--master_addr "$master_addr")
cmd+=(--master_port "$master_port")
((!no_ssh)) || cmd+=(--no_ssh --node_rank "$node_rank")
cmd+=("$ROOT/fine-tune/fine-tune.py")
cmd+=(${passthrough[@]+"${passthrough[@]}"})

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
((!dry_run)) || exit 0
exec "${cmd[@]}"
