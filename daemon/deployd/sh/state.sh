cd "$dt" 2>/dev/null || exit 0
current_name
[ -z "$cur" ] && [ -L current ] && cur=$(readlink current)
printf 'current=%s\n' "$cur"
if [ -n "$cur" ] && [ -f current/REVISION ]; then
    _r=
    read -r _r < current/REVISION
    printf 'current_revision=%s\n' "$_r"
fi
for _d in releases/*; do
    [ -d "$_d" ] || continue
    case $_d in *"
"*) continue ;; esac
    _r=
    [ -f "$_d/REVISION" ] && read -r _r < "$_d/REVISION"
    printf 'release=%s\t%s\n' "${_d#releases/}" "$_r"
done
read_lock && show lock. "$lockf"
exit 0
