cd "$dt" || fail 3 "$dt does not exist on $host"
if read_lock && [ "$held" != "$token" ]; then
    show lock. "$lockf"
    fail 4 "deploy lock $lockf was taken by someone else"
fi
[ -n "$unlock" ] && trap 'drop_lock' EXIT
# A switched host whose restart hook never ran would serve the old code from the new release:
# finish even if deployd vanishes.
trap '' HUP PIPE
current_name
[ "$cur" = "$release" ] || fail 3 "current on $host is ${cur:-missing}, not release $release"
export DEPLOYD_RELEASE_PATH="$dt/releases/$release"
if [ -z "$DEPLOYD_REVISION" ]; then
    _r=
    [ -f "$dt/releases/$release/REVISION" ] && read -r _r < "$dt/releases/$release/REVISION"
    export DEPLOYD_REVISION="$_r"
fi
_rb=0
[ -n "$rollback_hook" ] && { run_hook rollback "$dt/current" "$rollback_hook" || _rb=$?; }
[ -n "$restart_hook" ] && { run_hook restart "$dt/current" "$restart_hook" || exit 5; }
[ $_rb -eq 0 ] || exit 5
exit 0
