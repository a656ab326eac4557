cd "$dt" || fail 3 "$dt does not exist on $host"
if read_lock && [ "$held" != "$token" ]; then
    show lock. "$lockf"
    fail 4 "deploy lock $lockf was taken by someone else"
fi
current_name
printf 'previous=%s\n' "$cur"
[ "$cur" = "$release" ] && exit 0
if [ -z "$release" ]; then
    rm -f "$dt/current" || fail 3 "cannot remove current"
    printf 'switched=\n'
    exit 0
fi
[ -d "$dt/releases/$release" ] || fail 3 "release $release does not exist on $host"
switch_over "$release"
printf '%s\n' "$log_line" >> "$dt/revisions.log" || fail 3 "cannot append to revisions.log"
export DEPLOYD_RELEASE_PATH="$dt/releases/$release"
_r=
read -r _r < "$dt/releases/$release/REVISION"
export DEPLOYD_REVISION="$_r"
[ -n "$restart_hook" ] && { run_hook restart "$dt/current" "$restart_hook" || exit 5; }
exit 0
