cd "$dt" 2>/dev/null || exit 0
current_name
if [ -n "$release" ] && [ -d "$dt/releases/$release" ]; then
    [ "$release" = "$cur" ] && fail 3 "release $release is live on $host; not removing it"
    rm -rf "$dt/releases/$release" || fail 3 "cannot remove release $release"
    printf 'removed=%s\n' "$release"
fi
[ -n "$token" ] && drop_lock
exit 0
