#!/usr/bin/env bash
# Build signed apt and yum repositories in dist/repo/ from the packages in dist/.
#
#   dist/repo/apt/                             apt repository (reprepro): suite "stable",
#                                              component "main", binary-amd64 and
#                                              binary-arm64; Release signed (InRelease,
#                                              Release.gpg)
#   dist/repo/yum/                             yum/dnf repository (createrepo_c): the .rpms
#                                              in x86_64/ and aarch64/, signed (rpmsign),
#                                              under one repodata/repomd.xml (dnf picks a
#                                              node's own architecture from it), signed
#                                              (repomd.xml.asc)
#   dist/repo/dm-agent-archive-keyring.gpg     the public key, binary (apt's signed-by=)
#   dist/repo/dm-agent-archive-keyring.asc     the same, armored (yum's gpgkey=, rpm --import)
#   dist/repo/dm-agent.list, dist/repo/dm-agent.repo   what a node adds to its sources
#   dist/repo/dm-agent-<version>[-aarch64].cdx.json  the payloads' bills of materials
#                                              (CycloneDX), and their detached signatures (.asc)
#
# The repositories are made afresh at every run from the packages of every architecture
# in DM_REPO_ARCHES (default "amd64 arm64"; make packages builds them):
# dist/dm-agent_<version>_<arch>.deb and dist/dm-agent-<version>-1.<machine>.rpm.
#
# Signing key:
#   default      a throwaway key, generated once into build/repo-gnupg/ (no passphrase),
#                for tests only: nodes must never trust it, and every file a node would
#                read says so
#   real key     DM_REPO_GNUPGHOME=/path/to/gnupghome DM_REPO_KEY=<fingerprint>; the key
#                must sign without a prompt (gpg-agent with the passphrase preset, or a
#                signing subkey on a token), see docs/packaging.md
#   A release (DM_REPO_URL or DM_RELEASE set) without DM_REPO_KEY is refused: a forgotten
#   key must not publish a repository signed with the throwaway one. DM_REPO_THROWAWAY=1
#   allows it anyway (a test of the release path).
# Environment:   DM_REPO_URL (default https://packages.dm-agent.invalid/repo): the URL
#                written into dm-agent.list and dm-agent.repo; DM_RELEASE, DM_REPO_THROWAWAY;
#                DM_REPO_ARCHES.
# Needs: reprepro, createrepo-c, gnupg, rpm (rpmsign).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=build-repo
# shellcheck source=packaging/package-common.sh
. "$HERE/package-common.sh"
need reprepro reprepro
need createrepo_c createrepo-c
need gpg gnupg
need gpgv gpgv
need rpmsign rpm

DIST=$REPO/dist
OUT=$DIST/repo
WORK=$REPO/build/repo
URL=${DM_REPO_URL:-https://packages.dm-agent.invalid/repo}
read -r -a ARCHES <<<"${DM_REPO_ARCHES:-${DM_ARCHES[*]}}"
((${#ARCHES[@]})) || die "DM_REPO_ARCHES is empty"
DEBS=()
RPMS=()
SBOMS=()
for arch in "${ARCHES[@]}"; do
  machine=$(dm_arch_triplet "$arch")
  deb=$DIST/dm-agent_${VERSION}_$arch.deb
  rpm=$DIST/dm-agent-$VERSION-1.$machine.rpm
  sbom=$DIST/dm-agent-$VERSION.cdx.json
  [[ $arch == amd64 ]] || sbom=$DIST/dm-agent-$VERSION-$machine.cdx.json
  [[ -f $deb ]] || die "no $deb: run packaging/build-deb.sh --arch $arch (or make packages)"
  [[ -f $rpm ]] || die "no $rpm: run packaging/build-rpm.sh --arch $arch (or make packages)"
  [[ -f $sbom ]] || die "no $sbom: run packaging/freeze.sh --arch $arch (or make packages)"
  DEBS+=("$deb")
  RPMS+=("$rpm")
  SBOMS+=("$sbom")
done

# --- the signing key -------------------------------------------------------------------
rpmdb=""
throwaway_home=""
cleanup() {
  if [[ -n $rpmdb ]]; then rm -rf "$rpmdb"; fi
  # gpg starts an agent for the throwaway home: stop it with the script (never an
  # operator's agent, which DM_REPO_GNUPGHOME leaves running).
  if [[ -n $throwaway_home ]]; then gpgconf --homedir "$throwaway_home" --kill gpg-agent || true; fi
}
trap cleanup EXIT
if [[ -n ${DM_REPO_KEY:-} ]]; then
  export GNUPGHOME=${DM_REPO_GNUPGHOME:?DM_REPO_KEY needs DM_REPO_GNUPGHOME}
  KEY=$DM_REPO_KEY
  gpg --batch --list-secret-keys "$KEY" >/dev/null 2>&1 || die "no secret key $KEY in $GNUPGHOME"
  log "signing with $KEY from $GNUPGHOME"
else
  if [[ -n ${DM_REPO_URL:-}${DM_RELEASE:-} && ${DM_REPO_THROWAWAY:-} != 1 ]]; then
    die "a release (DM_REPO_URL or DM_RELEASE is set) needs the release key:" \
      "set DM_REPO_GNUPGHOME and DM_REPO_KEY (docs/packaging.md: Signing with the real key);" \
      "DM_REPO_THROWAWAY=1 signs with the throwaway test key anyway"
  fi
  export GNUPGHOME=$REPO/build/repo-gnupg
  throwaway_home=$GNUPGHOME
  # Made once and reused; made again when it is gone or expired (it lives a year).
  fpr=$(cat "$GNUPGHOME/throwaway.fpr" 2>/dev/null || true)
  if [[ -z $fpr ]] || ! gpg --batch --with-colons --list-secret-keys "$fpr" 2>/dev/null |
    awk -F: '$1 == "sec" && $2 !~ /[erd]/ {ok = 1} END {exit !ok}'; then
    rm -rf "$GNUPGHOME"
    mkdir -p "$GNUPGHOME"
    chmod 0700 "$GNUPGHOME"
    # Only this key is in this keyring: no web of trust to compute.
    echo "trust-model always" >"$GNUPGHOME/gpg.conf"
    log "generating a throwaway signing key in $GNUPGHOME (tests only)"
    gpg --batch --passphrase '' --quick-gen-key \
      "dm-agent throwaway test repository key (never trust on a node) <repo@dm-agent.invalid>" \
      rsa3072 sign 1y >"$GNUPGHOME/keygen.log" 2>&1 || { cat "$GNUPGHOME/keygen.log" >&2; die "gpg --quick-gen-key failed"; }
    gpg --batch --no-auto-check-trustdb --with-colons --list-secret-keys | awk -F: '$1 == "fpr" {print $10; exit}' \
      >"$GNUPGHOME/throwaway.fpr"
  fi
  KEY=$(cat "$GNUPGHOME/throwaway.fpr")
  log "signing with the throwaway key $KEY (tests only: not for nodes)"
fi
# What the files a node reads say about the key.
if [[ -n $throwaway_home ]]; then
  NOTICE="TEST REPOSITORY, signed with a throwaway key: not for nodes"
  DESCRIPTION="dm-agent ($NOTICE)"
else
  NOTICE=""
  DESCRIPTION="dm-agent, the DockMaster node agent"
fi

rm -rf "$OUT" "$WORK"
mkdir -p "$OUT" "$WORK"
gpg --batch --export "$KEY" >"$OUT/dm-agent-archive-keyring.gpg"
gpg --batch --armor --export "$KEY" >"$OUT/dm-agent-archive-keyring.asc"
[[ -s $OUT/dm-agent-archive-keyring.gpg ]] || die "could not export the public key $KEY"

# --- apt: reprepro, its configuration and database kept out of what is published -------
mkdir -p "$WORK/apt/conf"
cat >"$WORK/apt/conf/distributions" <<EOF
Origin: dm-agent
Label: dm-agent
Suite: stable
Codename: stable
Architectures: ${ARCHES[*]}
Components: main
Description: $DESCRIPTION
SignWith: $KEY
EOF
for deb in "${DEBS[@]}"; do
  reprepro --silent --basedir "$WORK/apt" --outdir "$OUT/apt" includedeb stable "$deb"
done
gpgv --keyring "$OUT/dm-agent-archive-keyring.gpg" "$OUT/apt/dists/stable/InRelease" 2>/dev/null ||
  die "the apt repository's InRelease does not verify with the exported key"
log "apt: dist/repo/apt (stable/main/{${ARCHES[*]}}: ${DEBS[*]##*/})"

# --- yum: the signed .rpm, createrepo_c, a detached signature of repomd.xml -----------------
yum_rpms=()
for rpm in "${RPMS[@]}"; do
  machine=${rpm%.rpm}
  machine=${machine##*.}
  mkdir -p "$OUT/yum/$machine"
  cp "$rpm" "$OUT/yum/$machine/"
  yum_rpms+=("$machine/$(basename "$rpm")")
done
# (rpmsign warns that it cannot set GPG_TTY when stdin is no terminal: no prompt is needed.)
(cd "$OUT/yum" && rpmsign --define "__gpg $(command -v gpg)" --define "_gpg_name $KEY" \
  --addsign "${yum_rpms[@]}") 2>&1 >/dev/null | { grep -v GPG_TTY >&2 || true; }
createrepo_c --quiet --no-database --set-timestamp-to-revision --revision "$SOURCE_DATE_EPOCH" \
  "$OUT/yum" >/dev/null
gpg --batch --yes --local-user "$KEY" --armor --detach-sign "$OUT/yum/repodata/repomd.xml"
gpg --batch --verify "$OUT/yum/repodata/repomd.xml.asc" "$OUT/yum/repodata/repomd.xml" 2>/dev/null ||
  die "repomd.xml.asc does not verify"
cp "$OUT/dm-agent-archive-keyring.asc" "$OUT/yum/RPM-GPG-KEY-dm-agent"
rpmdb=$(mktemp -d)
rpm --dbpath "$rpmdb" --import "$OUT/dm-agent-archive-keyring.asc"
for rpm in "${yum_rpms[@]}"; do
  rpm --dbpath "$rpmdb" -K "$OUT/yum/$rpm" | grep -q 'signatures OK' ||
    die "the signed $rpm does not verify with the exported key"
done
log "yum: dist/repo/yum (${yum_rpms[*]}, signed; repodata/repomd.xml.asc)"

# --- the bill of materials, signed ----------------------------------------------------------
for sbom in "${SBOMS[@]}"; do
  cp "$sbom" "$OUT/"
  gpg --batch --yes --local-user "$KEY" --armor --detach-sign "$OUT/$(basename "$sbom")"
done

# --- what a node adds to its sources -----------------------------------------------------
warning=${NOTICE:+# $NOTICE
}
cat >"$OUT/dm-agent.list" <<EOF
$warning# /etc/apt/sources.list.d/dm-agent.list (key: /usr/share/keyrings/dm-agent-archive-keyring.gpg)
deb [signed-by=/usr/share/keyrings/dm-agent-archive-keyring.gpg] $URL/apt stable main
EOF
cat >"$OUT/dm-agent.repo" <<EOF
$warning# /etc/yum.repos.d/dm-agent.repo
[dm-agent]
name=$DESCRIPTION
baseurl=$URL/yum
enabled=1
gpgcheck=1
repo_gpgcheck=1
gpgkey=$URL/yum/RPM-GPG-KEY-dm-agent
EOF
log "made dist/repo/ in $(($(date +%s) - T0))s: apt/, yum/, dm-agent-archive-keyring.{gpg,asc}," \
  "dm-agent.list, dm-agent.repo, ${SBOMS[*]##*/} (+ .asc)${NOTICE:+ ($NOTICE)}"
echo "$OUT"
