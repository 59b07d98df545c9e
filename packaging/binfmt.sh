# shellcheck shell=bash
# qemu-user for aarch64 programs on an x86_64 host (sourced by buildroot-arm64.sh and
# freeze.sh; the caller defines log and die). ensure_binfmt makes the kernel run aarch64
# ELF files through qemu-aarch64-static, idempotently: it mounts binfmt_misc when it is not
# mounted (a fresh container, CI) and enables the handler that the qemu-user-static and
# binfmt-support packages install (.ci/deps). The handler must have the F flag (the
# kernel opens the interpreter when it is registered), so that it works in a chroot or a
# booted root that has no qemu of its own.
ensure_binfmt() {
  local dir=/proc/sys/fs/binfmt_misc handler=/proc/sys/fs/binfmt_misc/qemu-aarch64
  [[ $(uname -m) == aarch64 ]] && return 0
  if [[ ! -e $dir/status ]]; then
    mount -t binfmt_misc binfmt_misc "$dir" || die "cannot mount binfmt_misc on $dir"
  fi
  if [[ ! -e $handler ]] || ! grep -qx enabled "$handler"; then
    command -v update-binfmts >/dev/null ||
      die "no aarch64 binfmt handler: apt-get install qemu-user-static binfmt-support"
    update-binfmts --enable qemu-aarch64 >&2 ||
      die "update-binfmts --enable qemu-aarch64 failed (is qemu-user-static installed?)"
  fi
  grep -qx enabled "$handler" || die "the qemu-aarch64 binfmt handler is not enabled ($handler)"
  grep -q '^flags:.*F' "$handler" ||
    die "the qemu-aarch64 binfmt handler lacks the F flag ($handler): chroots cannot use it"
}
