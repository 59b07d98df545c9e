#!/usr/bin/env bash
# Check that every ELF file below DIR is built for one machine: x86_64 or aarch64.
#
# A payload frozen for arm64 must hold no x86_64 file (a library PyInstaller picked up
# from the wrong side of a multiarch or cross root, a wheel of the host's architecture):
# such a file would fail only on the node, when it is loaded. Reads e_machine from the
# ELF header (62 = x86_64, 183 = aarch64), little-endian 64-bit objects only.
#
# Usage: packaging/check-elf-arch.sh DIR x86_64|aarch64
# Prints how many ELF files it read; exits 1 naming every file of another machine, 2 on
# usage errors.
set -euo pipefail

dir=${1:-}
want=${2:-}
declare -A code=([x86_64]=62 [aarch64]=183)
[[ -d $dir && -n ${code[$want]:-} ]] || { echo "usage: check-elf-arch.sh DIR x86_64|aarch64" >&2; exit 2; }
declare -A name=([62]=x86_64 [183]=aarch64 [3]=i386 [40]=arm)

nfiles=0
bad=()
while IFS= read -r -d '' f; do
  [[ $(head -c 4 "$f" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] || continue
  nfiles=$((nfiles + 1))
  # EI_CLASS (byte 4) 2 = 64-bit, EI_DATA (byte 5) 1 = little-endian, e_machine at 18.
  ident=$(od -An -tu1 -j4 -N2 "$f" | tr -s ' ' | sed 's/^ //')
  machine=$(od -An -tu2 -j18 -N2 "$f" | tr -d ' ')
  if [[ $ident != "2 1" || $machine != "${code[$want]}" ]]; then
    bad+=("${f#"$dir"/}: ${name[$machine]:-e_machine $machine} (class/data $ident)")
  fi
done < <(find "$dir" -type f -print0 | sort -z)

if ((nfiles == 0)); then
  echo "check-elf-arch: no ELF file below $dir" >&2
  exit 2
fi
if ((${#bad[@]})); then
  printf "check-elf-arch: FAIL: %s, expected $want\n" "${bad[@]}" >&2
  exit 1
fi
echo "check-elf-arch: $nfiles ELF files below $dir, all $want"
