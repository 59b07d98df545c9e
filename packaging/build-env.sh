# shellcheck shell=bash disable=SC2034
# The build's facts and rules, in one place (sourced by buildroot.sh, freeze.sh,
# package-common.sh, smoke-frozen.sh, sbom; not run). The caller sets HERE (packaging/)
# and defines die.
#
#   PY_VERSION, PY_MM   the CPython the build root compiles, and its major.minor (the
#                       directory names in the payload: python3.13/, libpython3.13.so)
#   OSSL_VERSION        the OpenSSL it compiles
#   *_TARBALL, *_SHA256 their sources: Debian's .orig tarballs, pinned by sha256
#   PREFIX              where they are installed in the build root
#   dm_version          the version rule (below)
#   dm_source_date_epoch  the SOURCE_DATE_EPOCH rule (below)
#   dm_buildroot        the amd64 build root's path: DM_BUILDROOT, else a cache directory
#                       named after the root's recipe key, so roots of several recipes coexist
#   dm_buildroot_for ARCH  the build root of ARCH (amd64 or arm64; DM_BUILDROOT_ARM64, else
#                       the same kind of cache directory)
#   dm_arch_triplet ARCH  the machine name of a Debian architecture (amd64 -> x86_64,
#                       arm64 -> aarch64): uname -m, rpm's arch, the tarball's name

# Sources: Debian's .orig tarballs (identical to upstream's releases), checked by sha256.
# When Debian drops one from its pool, take the current one from `apt-get source
# --print-uris` (trixie) and update the version and hash here.
PY_VERSION=3.13.5
PY_MM=${PY_VERSION%.*}
PY_TARBALL=python${PY_MM}_${PY_VERSION}.orig.tar.xz
PY_POOL=pool/main/p/python${PY_MM}
PY_SHA256=93e583f243454e6e9e4588ca2c2662206ad961659863277afcdb96801647d640
OSSL_VERSION=3.5.7
OSSL_TARBALL=openssl_${OSSL_VERSION}.orig.tar.gz
OSSL_POOL=pool/main/o/openssl
OSSL_SHA256=a8c0d28a529ca480f9f36cf5792e2cd21984552a3c8e4aa11a24aa31aeac98e8
PREFIX=/opt/dm-build
# (the archive the tarballs are named after in the SBOM: the canonical one, whichever
# mirror DM_DEBIAN_MIRROR downloads them from)
DEBIAN_ARCHIVE=https://deb.debian.org/debian

# The version: dm_agent/__init__.py's __version__, the one place it lives. One rule for
# the frozen program, the .deb and the .rpm: numbers and dots (1.2.3). Each of the
# others breaks one of them: "-" is the revision separator of a Debian version and not
# allowed in an rpm Version; "~" is not a Python (PEP 440) version; and a PEP 440
# pre-release such as 1.0rc1 would sort *after* 1.0 in dpkg and rpm.
dm_version() {
  local v
  v=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$HERE/../dm_agent/__init__.py")
  [[ $v =~ ^[0-9]+(\.[0-9]+)*$ ]] ||
    die "dm_agent/__init__.py: __version__ = \"$v\" is not numbers and dots (e.g. 1.2.3), which is what dpkg, rpm and Python all read the same way"
  echo "$v"
}

# SOURCE_DATE_EPOCH (reproducible-builds.org): taken as it is when set, else the last
# commit's time; outside a git checkout it must be set. Every timestamp of the products
# (file mtimes, changelog dates, rpm's build time) is this one.
dm_source_date_epoch() {
  local t
  if [[ -n ${SOURCE_DATE_EPOCH:-} ]]; then
    [[ $SOURCE_DATE_EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH is not a number of seconds"
    echo "$SOURCE_DATE_EPOCH"
    return
  fi
  t=$(git -C "$HERE/.." log -1 --format=%ct 2>/dev/null) ||
    die "not a git checkout: set SOURCE_DATE_EPOCH (the time of the sources, in seconds since 1970)"
  echo "$t"
}

# The architectures the products are built for, by their Debian names.
DM_ARCHES=(amd64 arm64)

dm_buildroot() {
  if [[ -n ${DM_BUILDROOT:-} ]]; then
    echo "$DM_BUILDROOT"
  else
    echo "/var/cache/dm-agent/buildroot-bullseye-$("$HERE/buildroot.sh" --key | cut -c1-12)"
  fi
}

dm_buildroot_for() {
  case $1 in
    amd64) dm_buildroot ;;
    arm64)
      if [[ -n ${DM_BUILDROOT_ARM64:-} ]]; then
        echo "$DM_BUILDROOT_ARM64"
      else
        echo "/var/cache/dm-agent/buildroot-bullseye-arm64-$("$HERE/buildroot-arm64.sh" --key | cut -c1-12)"
      fi
      ;;
    *) die "unknown architecture '$1' (one of: ${DM_ARCHES[*]})" ;;
  esac
}

dm_arch_triplet() {
  case $1 in
    amd64) echo x86_64 ;;
    arm64) echo aarch64 ;;
    *) die "unknown architecture '$1' (one of: ${DM_ARCHES[*]})" ;;
  esac
}
