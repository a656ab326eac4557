cd "$dt" 2>/dev/null || exit 0
current_name
_total=0
for _d in releases/[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]; do
    [ -d "$_d" ] && _total=$((_total + 1))
done
_excess=$((_total - keep))
for _d in releases/[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]; do
    [ "$_excess" -gt 0 ] || break
    [ -d "$_d" ] || continue
    _excess=$((_excess - 1))
    _n=${_d#releases/}
    [ "$_n" = "$cur" ] && continue
    case " $protect " in *" $_n "*) continue ;; esac
    if rm -rf "$_d"; then printf 'removed=%s\n' "$_n"; else printf 'kept=%s\n' "$_n"; fi
done
[ -n "$token" ] && drop_lock
exit 0
