# Shared by the scripts that install what they need from Debian's packages. Source it after defining
# `say` (a one-line message to stderr).

apt_updated=0
# apt_install PACKAGE...: installs them with apt-get (through sudo when not root), updating the
# package lists once per run; fails when there is no apt-get.
apt_install() {
    if ! command -v apt-get >/dev/null; then
        say "missing $*, and no apt-get to install it"
        return 1
    fi
    local sudo=()
    if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi
    if [ $apt_updated = 0 ]; then
        "${sudo[@]}" apt-get update -qq >&2
        apt_updated=1
    fi
    say "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >&2
}

# find_chromium: prints the path of a chromium binary, installing Debian's (and a font) if missing.
find_chromium() {
    local c
    c=$(command -v chromium || command -v chromium-browser || true)
    if [ -z "$c" ]; then
        apt_install chromium fonts-dejavu-core
        c=$(command -v chromium)
    fi
    printf '%s\n' "$c"
}
