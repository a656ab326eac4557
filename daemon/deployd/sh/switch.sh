cd "$dt" || fail 3 "$dt does not exist on $host"
own_lock
[ -d "$dt/releases/$release" ] || fail 3 "release $release does not exist on $host"
current_name
printf 'previous=%s\n' "$cur"
switch_over "$release"
printf '%s\n' "$log_line" >> "$dt/revisions.log" || fail 3 "cannot append to revisions.log"
export DEPLOYD_RELEASE_PATH="$dt/releases/$release"
[ -n "$restart_hook" ] && { run_hook restart "$dt/current" "$restart_hook" || exit 5; }
exit 0
