#!/usr/bin/env bash
# Install SLURM (slurm-wlm) and munge for the private test cluster in tests/slurm/ (see its README.md).
#
# Idempotent: exits 0 at once when every binary is already there. Otherwise installs the
# Debian/Ubuntu packages with apt-get, running `apt-get update` only when the package
# index does not know them (or the first install attempt fails). The system services
# that the packages ship (munge, slurmctld, slurmd) are NOT started: the tests start
# their own private daemons and never use /etc/slurm or the system munge socket.
#
# Usage: sudo .ci/install_slurm.sh        (needs root; apt-get + dpkg)
set -euo pipefail

PACKAGES=(slurm-wlm munge)
BINARIES=(munged slurmctld slurmd sbatch srun squeue scontrol scancel sinfo)
APT_TIMEOUT=${APT_TIMEOUT:-1200}   # seconds per apt-get call
export PATH="$PATH:/usr/sbin:/sbin:/usr/local/sbin"
export DEBIAN_FRONTEND=noninteractive

die() { echo "install_slurm.sh: ERROR: $*" >&2; exit 1; }

missing_binaries() {
    local b out=()
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
    echo "${out[*]}"
}

missing=$(missing_binaries)
if [[ -z "$missing" ]]; then
    echo "install_slurm.sh: slurm and munge already installed ($(slurmctld -V 2>/dev/null || echo '?'))"
    exit 0
fi
echo "install_slurm.sh: missing: $missing -> installing ${PACKAGES[*]}"

command -v apt-get >/dev/null 2>&1 \
    || die "apt-get not found; install ${PACKAGES[*]} (providing: ${BINARIES[*]}) with your package manager"
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n --preserve-env=APT_TIMEOUT "$0" "$@"
    fi
    die "must run as root (or with passwordless sudo) to apt-get install ${PACKAGES[*]}"
fi

# Keep package post-install scripts from starting the system daemons.
POLICY=/usr/sbin/policy-rc.d
if [[ ! -e $POLICY ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    trap 'rm -f "$POLICY"' EXIT
fi

apt_get() {
    timeout "$APT_TIMEOUT" apt-get -o DPkg::Lock::Timeout=300 "$@"
}

known_to_apt() {
    local p policy
    for p in "${PACKAGES[@]}"; do
        # (no `apt-cache | grep -q`: with pipefail, grep's early exit fails apt-cache)
        policy=$(timeout 60 apt-cache policy "$p" 2>/dev/null) || return 1
        [[ $policy == *"Candidate: "[!\(]* ]] || return 1
    done
}

updated=0
if ! known_to_apt; then
    echo "install_slurm.sh: package index lacks ${PACKAGES[*]}: apt-get update"
    apt_get update -q || die "apt-get update failed (network / apt sources?)"
    updated=1
fi
install() { apt_get install -y -q --no-install-recommends "${PACKAGES[@]}"; }
if ! install; then
    [[ $updated == 1 ]] && die "apt-get install ${PACKAGES[*]} failed"
    echo "install_slurm.sh: install failed; retrying after apt-get update" >&2
    apt_get update -q || die "apt-get update failed (network / apt sources?)"
    install || die "apt-get install ${PACKAGES[*]} failed"
fi

missing=$(missing_binaries)
[[ -z "$missing" ]] || die "still missing after install: $missing"
echo "install_slurm.sh: OK ($(slurmctld -V))"
