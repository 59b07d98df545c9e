# shellcheck shell=bash
# Mount bookkeeping shared by the build roots (through root-common.sh), freeze.sh and
# smoke-frozen.sh (sourced, not run). The caller defines log and die. Every mount made
# through mount_api is recorded in MOUNTS and undone by umount_all, the last made first; a
# tree is never deleted while anything is mounted below it (rm -rf through a bind mount of
# /dev would empty the host's /dev).

MOUNTS=()

# The host's /proc and /dev inside root $1, for chroot. A failing mount stops the script.
mount_api() {
  mount -t proc proc "$1/proc"
  MOUNTS+=("$1/proc")
  mount --bind /dev "$1/dev"
  MOUNTS+=("$1/dev")
}

umount_all() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" || true
  done
  MOUNTS=()
}

# Mount points at or below $1, deepest first.
mounts_below() {
  local dir
  dir=$(readlink -f "$1")
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r
}

# Unmount what an earlier, killed run left mounted below $1.
umount_stale() {
  local mp
  while read -r mp; do
    [[ -n $mp ]] || continue
    log "unmounting stale $mp"
    umount "$mp" 2>/dev/null || umount -l "$mp"
  done < <(mounts_below "$1")
}

safe_rm_tree() {
  [[ -e $1 ]] || return 0
  [[ -z $(mounts_below "$1") ]] || die "something is mounted below $1, not deleting it"
  rm -rf --one-file-system "$1"
}
