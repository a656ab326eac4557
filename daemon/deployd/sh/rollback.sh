cd "$dt" 2>/dev/null || fail 3 "$dt does not exist on $host"
[ -d "$dt/releases/$release" ] || fail 3 "release $release does not exist on $host"
_r=
[ -f "$dt/releases/$release/REVISION" ] && read -r _r < "$dt/releases/$release/REVISION"
if [ -n "$expect_revision" ] && [ "$_r" != "$expect_revision" ]; then
    fail 3 "release $release on $host holds revision ${_r:-none}, expected $expect_revision"
fi
trap '[ -n "$took" ] && drop_lock' EXIT
trap 'exit 143' TERM HUP INT
trap 'exit 141' PIPE
take_lock
current_name
printf 'previous=%s\n' "$cur"
switch_over "$release"
_from=${from_release:-$cur}
if [ -n "$_from" ] && [ "$_from" != "$release" ] && [ -d "$dt/releases/$_from" ]; then
    rm -f "$dt/releases/$_from/ROLLED_BACK"  # never write through a symlink a commit held
    printf '%s' "$marker" > "$dt/releases/$_from/ROLLED_BACK" \
        && printf 'to_revision=%s\n' "$_r" >> "$dt/releases/$_from/ROLLED_BACK" \
        && printf 'marked=%s\n' "$_from"
    # Capistrano picks releases by mtime (ls -xt): the marker must not make this one newest.
    [ -e "$dt/releases/$_from/REVISION" ] \
        && touch -r "$dt/releases/$_from/REVISION" "$dt/releases/$_from"
fi
printf '%s\n' "$log_line" >> "$dt/revisions.log" || fail 3 "cannot append to revisions.log"
export DEPLOYD_RELEASE_PATH="$dt/releases/$release" DEPLOYD_REVISION="$_r"
_rb=0
[ -n "$rollback_hook" ] && { run_hook rollback "$dt/current" "$rollback_hook" || _rb=$?; }
[ -n "$restart_hook" ] && { run_hook restart "$dt/current" "$restart_hook" || exit 5; }
[ $_rb -eq 0 ] || exit 5
exit 0
