#!/usr/bin/env bash
# What the frozen payload needs of the system it runs on, as package dependencies.
#
# dpkg-shlibdeps and rpm's find-requires cannot be used on a PyInstaller onedir: its
# bundled libraries are private (not in ld.so's search path), so they would be reported
# as missing, or resolved against the build host's own copies. Instead this reads the
# ELF headers of every file in the payload:
#   - the glibc floor: the highest GLIBC_x.y symbol version any file needs, as
#     packaging/check-glibc.sh finds it (which also fails above DM_GLIBC_MAX, default 2.31);
#   - every DT_NEEDED library that is not bundled: each must be one of glibc's (then the
#     floor covers it) or be mapped below to the package that ships it, else this fails.
#
# Usage: packaging/payload-deps.sh deb DIR    prints  dm-agent:Depends=libc6 (>= 2.30)[, ...]
#        packaging/payload-deps.sh rpm DIR    prints  glibc >= 2.30[, ...]
#        packaging/payload-deps.sh floor DIR  prints  2.30
# Needs objdump (binutils).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mode=${1:-}
dir=${2:-}
[[ $mode =~ ^(deb|rpm|floor)$ && -d $dir ]] || {
  echo "usage: $0 deb|rpm|floor DIR" >&2
  exit 64
}

# Libraries of glibc itself: covered by the glibc dependency and its floor.
declare -A glibc=()
for s in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 \
  libresolv.so.2 libanl.so.1 ld-linux-x86-64.so.2 ld-linux-aarch64.so.1; do glibc[$s]=1; done
# Other system libraries a payload may need, and their packages (Debian | RPM; the same
# on x86_64 and aarch64, both LP64: rpm's "(64bit)" marks either).
declare -A deb_pkg=([libz.so.1]=zlib1g [libcrypt.so.1]=libcrypt1 [libgcc_s.so.1]=libgcc-s1)
declare -A rpm_pkg=([libz.so.1]='libz.so.1()(64bit)' [libcrypt.so.1]='libcrypt.so.1()(64bit)'
  [libgcc_s.so.1]='libgcc_s.so.1()(64bit)')

out=$("$HERE/check-glibc.sh" "$dir" "${DM_GLIBC_MAX:-2.31}")
floor=$(sed -n 's/.*highest glibc version needed: GLIBC_\([0-9.]*\) .*/\1/p' <<<"$out")
[[ $floor =~ ^[0-9]+\.[0-9]+$ ]] || {
  echo "payload-deps: no glibc floor in check-glibc's output: $out" >&2
  exit 1
}
if [[ $mode == floor ]]; then
  echo "$floor"
  exit 0
fi

declare -A bundled=()
while IFS= read -r -d '' f; do
  bundled[$(basename "$f")]=1
done < <(find "$dir" -type f -print0)

declare -A needed=()
while IFS= read -r -d '' f; do
  [[ $(head -c 4 "$f" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] || continue
  while read -r soname; do
    needed[$soname]=1
  done < <(objdump -p "$f" | awk '$1 == "NEEDED" {print $2}')
done < <(find "$dir" -type f -print0)

extra_deb=()
extra_rpm=()
unknown=()
for soname in $(printf '%s\n' "${!needed[@]}" | sort); do
  [[ -n ${bundled[$soname]:-} ]] && continue
  [[ -n ${glibc[$soname]:-} ]] && continue
  if [[ -n ${deb_pkg[$soname]:-} ]]; then
    extra_deb+=("${deb_pkg[$soname]}")
    extra_rpm+=("${rpm_pkg[$soname]}")
  else
    unknown+=("$soname")
  fi
done
if ((${#unknown[@]})); then
  echo "payload-deps: the payload needs system libraries with no known package:" \
    "${unknown[*]} (bundle them, or map them in $0)" >&2
  exit 1
fi

join() {
  local IFS=,
  local s="$*"
  echo "${s//,/, }"
}
case $mode in
  deb) echo "dm-agent:Depends=$(join "libc6 (>= $floor)" ${extra_deb[@]+"${extra_deb[@]}"})" ;;
  rpm) join "glibc >= $floor" ${extra_rpm[@]+"${extra_rpm[@]}"} ;;
esac
