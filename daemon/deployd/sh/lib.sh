# shellcheck shell=dash
# shellcheck disable=SC2154,SC2317
# deployd writes each value as a quoted assignment before this library (SC2154), and each step's
# script after it calls only the functions it needs (SC2317).
unset CDPATH
lockf="$dt/.deployd.lock"
took=
fail() { _s=$1; shift; printf 'deployd: %s\n' "$*" >&2; exit "$_s"; }
read_lock() {
    held=
    [ -f "$lockf" ] || return 1
    while IFS= read -r _l || [ -n "$_l" ]; do
        case $_l in token=*) held=${_l#token=} ;; esac
    done < "$lockf" 2>/dev/null
    return 0
}
show() {
    while IFS= read -r _l || [ -n "$_l" ]; do printf '%s%s\n' "$1" "$_l"; done < "$2" 2>/dev/null
}
create_lock() {
    set -C
    { printf '%s' "$lock_content" > "$lockf"; } 2>/dev/null
    _s=$?
    set +C
    # shellcheck disable=SC2034  # read by the step that took the lock
    [ "$_s" -eq 0 ] && took=1
    return "$_s"
}
take_over() {
    _st="$lockf.stale.$$"
    mv -f "$lockf" "$_st" 2>/dev/null || return 1
    _mine=$held
    held=
    while IFS= read -r _l || [ -n "$_l" ]; do
        case $_l in token=*) held=${_l#token=} ;; esac
    done < "$_st" 2>/dev/null
    if [ "$held" != "$_mine" ]; then
        ln "$_st" "$lockf" 2>/dev/null
        rm -f "$_st"
        return 1
    fi
    show took_over. "$_st"
    rm -f "$_st"
    create_lock
}
take_lock() {
    create_lock && return 0
    read_lock
    [ -n "$held" ] && [ "$held" = "$token" ] && return 0
    if [ -n "$takeover" ] && [ "$held" = "$takeover" ] && take_over; then return 0; fi
    show lock. "$lockf"
    fail 4 "deploy lock $lockf is held"
}
own_lock() {
    read_lock || fail 3 "the deploy lock $lockf was removed while this deploy held it"
    [ "$held" = "$token" ] && return 0
    show lock. "$lockf"
    fail 4 "deploy lock $lockf was taken by someone else"
}
drop_lock() {
    read_lock && [ "$held" = "$token" ] && rm -f "$lockf"
    return 0
}
current_name() {
    cur=
    if cd -P "$dt/current" 2>/dev/null; then
        cur=${PWD##*/}
        cd "$dt" || fail 3 "cannot enter $dt"
    fi
}
switch_to() {
    _tmp="$dt/.current.$$"
    ln -sfn "$dt/releases/$1" "$_tmp" && mv -fT "$_tmp" "$dt/current" && return 0
    rm -f "$_tmp"
    fail 3 "switching current to release $1 failed"
}
# Points current at releases/$1 and says so. From the switch on the step finishes (log line,
# hooks) even if deployd vanishes: a switched host whose restart hook never ran would serve the
# old code from the new release. Then holds (see hold_here).
switch_over() {
    trap '' HUP PIPE
    switch_to "$1"
    printf 'switched=%s\n' "$1"
    hold_here
}
# Right after a switch: with `hold` set, say so and wait for the end of stdin, which deployd
# sends once every host of the operation switched; the rest of the step (log line, marker,
# hooks) runs after that, so no host's bookkeeping delays another's switch. A vanished deployd
# ends stdin too: a switched host always finishes its step.
hold_here() {
    [ -n "$hold" ] || return 0
    printf 'held=1\n'
    while IFS= read -r _l; do :; done
    return 0
}
# The hook's shell reads the hook from the pipe, then runs it with stdin from /dev/null.
# shellcheck disable=SC2016  # expanded by that shell, not this one
hook_runner='_deployd_hook=$(cat) || exit 126; exec < /dev/null; eval "$_deployd_hook"'
run_hook() {
    cd "$2" || fail 3 "cannot enter $2 for the $1 hook"
    (
        # shellcheck disable=SC2086,SC2163  # hook_env is a list of variable names
        [ -z "$hook_env" ] || export $hook_env
        printf '%s\n' "$3" | timeout -k 5 "$hook_timeout" sh -c "$hook_runner" 1>&2
    )
    _s=$?
    cd "$dt" || fail 3 "cannot enter $dt"
    [ "$_s" -eq 0 ] && return 0
    printf 'hook_failed=%s %s\n' "$1" "$_s"
    if [ "$_s" -eq 124 ] || [ "$_s" -eq 137 ]; then
        printf "deployd: the %s hook timed out after %ss\n" "$1" "$hook_timeout" >&2
    else
        printf 'deployd: the %s hook failed (exit %s)\n' "$1" "$_s" >&2
    fi
    return "$_s"
}
