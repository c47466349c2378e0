# Sourced by the scripts that install commlens into a virtualenv (setup,
# test-releases, test-openstack, placement-venv): when to install it again.

# True (0) when the install that wrote stamp file $1 is out of date: there is
# no stamp, or pyproject.toml, setup.py, any further file given ($2...) or a
# C file (the editable install compiles the extensions in place) is newer.
install_is_stale() {
    local stamp=$1 file
    shift
    [[ -f "$stamp" ]] || return 0
    for file in pyproject.toml setup.py "$@"; do
        [[ "$file" -nt "$stamp" ]] && return 0
    done
    [[ -n $(find tracer middleware \( -name '*.c' -o -name '*.h' \) -newer "$stamp" | head -1) ]]
}
