# Sourced by scripts/install_deps.sh and scripts/test.sh: where the Python package's virtual
# environment lives. Outside the clone (CI runs in a fresh clone on the same machine) and keyed by
# the hash of python/requirements.txt, so that a changed pin makes a new one; PyTorch from PyPI is
# ~5 GB installed, and created once it is reused. NSA_PYENV overrides the place.
nsa_pyenv() {
  local key
  key=$(sha256sum python/requirements.txt | cut -c1-12)
  echo "${NSA_PYENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nsa/venv-$key}"
}
