#!/usr/bin/env bash
# Check the glibc floor of a frozen program: every ELF file below DIR (the executable,
# libpython, the bundled libraries, the extension modules) must need no glibc symbol
# version newer than MAX (default 2.31, Debian 11), and none of glibc's private ones.
#
# Usage: packaging/check-glibc.sh DIR [MAX]
# Prints the highest GLIBC_x.y version needed and the file needing it; exits 1 naming
# every offending file when the floor is exceeded, 2 on usage errors. Needs objdump
# (binutils).
set -euo pipefail

dir=${1:?usage: check-glibc.sh DIR [MAX]}
max=${2:-2.31}
[[ -d $dir ]] || { echo "check-glibc: no such directory: $dir" >&2; exit 2; }
command -v objdump >/dev/null || { echo "check-glibc: objdump missing (apt-get install binutils)" >&2; exit 2; }

ver_gt() { [[ $1 != "$2" && $(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1) == "$1" ]]; }

nfiles=0
top=0
top_file=
bad=()
while IFS= read -r -d '' f; do
  # ELF files only, whatever their names (.so, .so.1.0, the executable, ossl-modules...).
  [[ $(head -c 4 "$f" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] || continue
  # Only what the dynamic loader loads: ET_EXEC (2) and ET_DYN (3); skip relocatable
  # objects (.o) and core files, which have no dynamic symbol table.
  etype=$(od -An -tu2 -j16 -N2 "$f" | tr -d ' ')
  [[ $etype == 2 || $etype == 3 ]] || continue
  nfiles=$((nfiles + 1))
  if ! syms=$(objdump -T "$f" 2>&1); then
    bad+=("$f: objdump -T failed: $(tr '\n' ' ' <<<"$syms")")
    continue
  fi
  if grep -q 'GLIBC_PRIVATE' <<<"$syms"; then
    bad+=("$f: needs GLIBC_PRIVATE symbols (tied to one glibc build)")
  fi
  need=$(grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' <<<"$syms" | sed 's/^GLIBC_//' | sort -uV | tail -1 || true)
  [[ -n $need ]] || continue
  if ver_gt "$need" "$max"; then
    bad+=("$f: needs GLIBC_$need")
  fi
  if [[ $top == 0 ]] || ver_gt "$need" "$top"; then
    top=$need
    top_file=$f
  fi
done < <(find "$dir" -type f -print0 | sort -z)

if ((nfiles == 0)); then
  echo "check-glibc: no ELF file below $dir" >&2
  exit 2
fi
echo "check-glibc: $nfiles ELF files below $dir; highest glibc version needed: GLIBC_$top (${top_file#"$dir"/}); allowed: GLIBC_$max"
if ((${#bad[@]})); then
  printf 'check-glibc: FAIL: %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "check-glibc: OK"
