#!/usr/bin/env bash
# Installs dna_jax on every worker of the TPU VM: code (git clone or a copy of this checkout),
# a Python >= 3.11 virtual environment, requirements.txt and jax[tpu].
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LIBTPU_URL="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

usage() {
  cat <<HELP
Usage: tpu_scripts/install.sh [options]

On all workers (--worker=all): puts the code in ~/$REMOTE_DIR (git clone of --repo-url, or a
copy of this checkout sent with gcloud scp), creates the venv ~/$REMOTE_VENV with
$REMOTE_PYTHON (installed with apt when missing), then
  pip install -r requirements.txt
  pip install -U "jax[tpu]==VERSION" -f $LIBTPU_URL
with VERSION the jax pin of requirements.txt. Rerunning it updates the code and packages.
Environment: REMOTE_DIR, REMOTE_VENV, REMOTE_PYTHON change the names above.

$COMMON_HELP
HELP
}

while (($#)); do
  parse_common_option "$@"
  if ((SHIFT_BY)); then
    shift "$SHIFT_BY"
    continue
  fi
  die "unknown option: $1 (see --help)"
done

JAX_VERSION="$(sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' "$REPO_ROOT/requirements.txt")"
[[ -n $JAX_VERSION ]] || die "no 'jax==VERSION' line in $REPO_ROOT/requirements.txt"

dir=$(shell_quote "$REMOTE_DIR")
venv=$(shell_quote "$REMOTE_VENV")
python=$(shell_quote "$REMOTE_PYTHON")

# 1. The code.
if [[ -n $REPO_URL ]]; then
  clone=(git clone --depth=1)
  [[ -z $REPO_BRANCH ]] || clone+=(--branch "$REPO_BRANCH")
  clone+=("$REPO_URL" "$REMOTE_DIR")
  get_code="if [ -d $dir/.git ]; then git -C $dir pull --ff-only; else $(quote_words "${clone[@]}"); fi"
else
  # A copy of this checkout (uncommitted changes included), without git data, venvs and caches.
  tarball="${TMPDIR:-/tmp}/${TPU_NAME}_dna_jax_code.tar.gz"
  run tar --exclude=.git --exclude=.venv --exclude=venv --exclude=__pycache__ --exclude='*.pyc' \
    --exclude=.pytest_cache --exclude='./workdir*' -czf "$tarball" -C "$REPO_ROOT" .
  tpu_scp_to_all "$tarball" dna_jax_code.tar.gz
  get_code="mkdir -p $dir && tar -xzf dna_jax_code.tar.gz -C $dir && rm dna_jax_code.tar.gz"
fi

# 2. Python >= 3.11 (the TPU VM images ship Ubuntu 22.04's 3.10), the venv and the packages.
apt_get="sudo apt-get -q -o DPkg::Lock::Timeout=600"
venv_package=$(shell_quote "$REMOTE_PYTHON-venv")
get_python="command -v $python >/dev/null 2>&1 || { $apt_get update && $apt_get install -y $python $venv_package; }"
make_venv="[ -x $venv/bin/python ] || $python -m venv $venv"
pip="$venv/bin/python -m pip install -q"
jax_tpu=$(shell_quote "jax[tpu]==$JAX_VERSION")
install_packages="$pip -U pip && $pip -r $dir/requirements.txt && $pip -U $jax_tpu -f $LIBTPU_URL"
check="$venv/bin/python -c 'import jax; print(\"jax\", jax.__version__)' && echo \"dna_jax installed on \$(hostname)\""

tpu_ssh all "set -eu; $get_code; $get_python; $make_venv; $install_packages; $check"
