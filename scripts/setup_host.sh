#!/bin/bash
# Set up a fresh cloud machine (a TPU VM worker, a SkyPilot node) from the repository root:
#
#   bash scripts/setup_host.sh JAX [--gcsfuse]      # JAX: tpu, cuda13 or cuda12, as `make setup JAX=...`
#
# A Python >= 3.11 (Ubuntu 22.04 images have 3.10: python3.11 from apt), then .venv with the JAX of the machine
# (`make setup JAX=...`). --gcsfuse also installs Cloud Storage FUSE, with which each run of a TPU script mounts
# the gs:// bucket holding the workdirs. The files of `scripts/sweep.py --emit tpu` and `--emit skypilot` run it on
# every host; running it again changes nothing that is in place.
set -euo pipefail
jax=${1:?usage: bash scripts/setup_host.sh JAX [--gcsfuse] (JAX: tpu, cuda13 or cuda12)}

updated=0
apt_install() {
  if [ "$updated" = 0 ]; then sudo apt-get update -q; updated=1; fi
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

py=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py=$candidate
    break
  fi
done
if [ -z "$py" ]; then
  apt_install python3.11 python3.11-venv
  py=python3.11
fi
# Ubuntu's pythons without their -venv package cannot bootstrap pip into a venv
"$py" -c 'import ensurepip' 2>/dev/null || apt_install "$(basename "$py")-venv"
command -v make >/dev/null || apt_install make

if [ "${2:-}" = --gcsfuse ] && ! command -v gcsfuse >/dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt" \
    "gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc \
    >/dev/null
  updated=0
  apt_install gcsfuse
fi

make setup JAX="$jax" PY="$py"
