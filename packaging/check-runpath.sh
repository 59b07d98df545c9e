#!/usr/bin/env bash
# Check that no ELF file below DIR carries a RUNPATH or an RPATH.
#
# A search path baked into a bundled library is a directory the loader tries before the
# system's: one into the build root (/opt/dm-build/...) does not exist on a node, and
# whoever creates it there would decide which libssl the agent loads. The payload's
# libraries are found in _internal/, where PyInstaller's bootloader points the loader.
#
# Usage: packaging/check-runpath.sh DIR
# Prints how many ELF files it read; exits 1 naming every file with a RUNPATH or RPATH
# (and the path), 2 on usage errors. Needs readelf (binutils).
set -euo pipefail

dir=${1:?usage: check-runpath.sh DIR}
[[ -d $dir ]] || { echo "check-runpath: no such directory: $dir" >&2; exit 2; }
command -v readelf >/dev/null || { echo "check-runpath: readelf missing (apt-get install binutils)" >&2; exit 2; }

nfiles=0
bad=()
while IFS= read -r -d '' f; do
  [[ $(head -c 4 "$f" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] || continue
  nfiles=$((nfiles + 1))
  if ! dyn=$(readelf -d "$f" 2>&1); then
    bad+=("${f#"$dir"/}: readelf -d failed: $(tr '\n' ' ' <<<"$dyn")")
    continue
  fi
  # e.g. " 0x000000000000001d (RUNPATH)            Library runpath: [/opt/dm-build/python/lib]"
  while read -r line; do
    bad+=("${f#"$dir"/}: $line")
  done < <(sed -n 's/^.*(\(RUNPATH\|RPATH\)) *Library r[a-z]*path: \(.*\)$/\1 \2/p' <<<"$dyn")
done < <(find "$dir" -type f -print0 | sort -z)

if ((nfiles == 0)); then
  echo "check-runpath: no ELF file below $dir" >&2
  exit 2
fi
if ((${#bad[@]})); then
  printf 'check-runpath: FAIL: %s\n' "${bad[@]}" >&2
  echo "check-runpath: ${#bad[@]} RUNPATH/RPATH entries in the $nfiles ELF files below $dir" >&2
  exit 1
fi
echo "check-runpath: $nfiles ELF files below $dir; no RUNPATH, no RPATH"
