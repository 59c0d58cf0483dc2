# shellcheck shell=bash
# Sourced by multinode.sh and slurm.sbatch (not run on its own): this node's address and network
# interface from the kernel's route to MASTER_ADDR, with no hostname resolution and no 127.0.0.1.
#
#   node_net <node rank>
#
# Reads MASTER_ADDR (an IP address of node 0) and the overrides NODE_ADDR, NODE_IFNAME,
# GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME; sets NODE_ADDR and NODE_IFNAME and exports
# GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (default: NODE_IFNAME). Node 0 must hold MASTER_ADDR
# (NODE_ADDR = MASTER_ADDR, NODE_IFNAME = the interface holding it; so does any node started on the
# same machine); another node takes the route's "src" and "dev". Errors go through die().

node_net() {
  local rank=$1 route derived_addr="" derived_ifname="" i
  local -a words held
  if [[ -z "${NODE_ADDR:-}" || -z "${NODE_IFNAME:-}" ]]; then
    command -v ip >/dev/null || die "the 'ip' command (iproute2) is missing: set NODE_ADDR and NODE_IFNAME"
    route=$(ip -o route get "$MASTER_ADDR" 2>&1) \
      || die "no route to MASTER_ADDR=$MASTER_ADDR ($route); set MASTER_ADDR to node 0's address"
    route=${route%% \\*}  # one line: drop "\    cache ..."
    if [[ $route == local\ * ]]; then  # this machine holds MASTER_ADDR: node 0 (or all nodes on one machine)
      read -r -a held <<<"$(ip -o addr show to "$MASTER_ADDR")"
      (( ${#held[@]} >= 2 )) || die "no interface holds MASTER_ADDR=$MASTER_ADDR; set NODE_IFNAME"
      derived_addr=$MASTER_ADDR
      derived_ifname=${held[1]%%@*}
    elif (( rank == 0 )); then
      die "node 0 hosts the rendezvous, but MASTER_ADDR=$MASTER_ADDR is not one of its addresses \
(route: $route). Set MASTER_ADDR to node 0's address on the network the nodes share (ip -o -4 addr lists them)."
    else
      read -r -a words <<<"$route"
      for ((i = 0; i + 1 < ${#words[@]}; i++)); do
        case ${words[i]} in
          src) derived_addr=${words[i + 1]} ;;
          dev) derived_ifname=${words[i + 1]} ;;
        esac
      done
      [[ -n $derived_addr && -n $derived_ifname ]] \
        || die "cannot read this node's address from the route to $MASTER_ADDR ($route); set NODE_ADDR and NODE_IFNAME"
    fi
    NODE_ADDR=${NODE_ADDR:-$derived_addr}
    NODE_IFNAME=${NODE_IFNAME:-$derived_ifname}
  fi
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NODE_IFNAME}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NODE_IFNAME}
}
