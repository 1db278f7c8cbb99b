# need <command> <debian package>: sourced by the bench scripts. Installs
# the package with apt-get when the command is missing and we run as root;
# exits when the command is still missing.
need() {
	command -v "$1" >/dev/null && return
	if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null ||
			{ apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y "$2" >/dev/null; }
	fi
	command -v "$1" >/dev/null || { echo "missing $1 (Debian package $2)" >&2; exit 1; }
}
