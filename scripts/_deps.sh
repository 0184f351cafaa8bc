# Shared by scripts/quickstart and scripts/test: install what is missing, nothing more.
# Debian packages via apt-get (as root, or through sudo), Python packages via pip.

_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_ensure() {  # apt_ensure PACKAGE... : install the Debian packages not yet installed
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}" >&2
    _as_root apt-get update -qq
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

pip_ensure() {  # pip_ensure EXTRAS : install this checkout (editable) with its dependencies
  local py="${PYTHON:-python3}"
  "$py" -m pip install -q --disable-pip-version-check -e ".${1:-}" 2>&1 \
    | grep -v -e "^WARNING: Location" -e "Running pip as the 'root'" >&2 || true
  "$py" -c "import pacsd" || { echo "pacsd did not install" >&2; exit 2; }
}
