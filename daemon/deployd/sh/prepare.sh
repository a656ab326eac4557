made=
# Splits linked path $1 into its directories (_dirs) and last component (_leaf), dropping
# empty and "." components.
split_path() {
    _dirs='' _leaf='' _rest=$1
    while [ -n "$_rest" ]; do
        _c=${_rest%%/*}
        case $_rest in */*) _rest=${_rest#*/} ;; *) _rest= ;; esac
        case $_c in ''|.) continue ;; ..) fail 3 "linked path $1 leads out of the release" ;; esac
        [ -n "$_leaf" ] && _dirs="$_dirs $_leaf"
        _leaf=$_c
    done
    [ -n "$_leaf" ] || fail 3 "linked path $1 names nothing"
}
# Whether directory $1, symlinks resolved, is $2 (a physical path) or below it.
inside() {
    _real=$(cd -P "$1" 2>/dev/null && pwd -P) || return 1
    case $_real in "$2"|"${2%/}"/*) return 0 ;; esac
    return 1
}
on_exit() {
    _s=$?
    if [ $_s -ne 0 ]; then
        [ -n "$made" ] && rm -rf "$rel"
        [ -n "$took" ] && drop_lock
    fi
}
trap on_exit EXIT
trap 'exit 143' TERM HUP INT
trap 'exit 141' PIPE
set -f
[ -d "$dt/releases" ] || mkdir -p "$dt/releases" || fail 3 "cannot create $dt/releases"
[ -d "$dt/shared" ] || mkdir -p "$dt/shared" || fail 3 "cannot create $dt/shared"
cd "$dt" || fail 3 "cannot enter $dt"
sharedp=$(cd -P "$dt/shared" && pwd -P) || fail 3 "cannot enter $dt/shared"
for _f in $linked_files; do
    [ -e "$dt/shared/$_f" ] || fail 3 "linked file $dt/shared/$_f does not exist on $host"
done
take_lock
rel="$dt/releases/$release"
[ -e "$rel" ] && fail 3 "release $release already exists on $host"
mkdir "$rel" || fail 3 "cannot create $rel"
made=1
relp=$(cd -P "$rel" && pwd -P) || fail 3 "cannot enter $rel"
tar -xf - -C "$rel" || fail 3 "unpacking the release into $rel failed"
# The commit may hold these names as symlinks: never write through one.
rm -f "$rel/REVISION" "$rel/REVISION_TIME" || fail 3 "cannot replace $rel/REVISION"
printf '%s\n' "$revision" > "$rel/REVISION" || fail 3 "cannot write $rel/REVISION"
printf '%s\n' "$revision_time" > "$rel/REVISION_TIME" || fail 3 "cannot write REVISION_TIME"
# Directories are made one at a time, never through a symlink the release brought along
# (a commit may hold `public -> /elsewhere`): the link's directory must be inside the release.
# In shared/ (operator-managed) existing entries are used as they are, symlinks included; a
# missing linked dir is only made where its parent resolves inside shared/.
for _p in $linked_dirs $linked_files; do
    split_path "$_p"
    _target="$dt/shared/$_p"
    case " $linked_dirs " in *" $_p "*)
        if [ ! -d "$_target" ]; then
            _d="$dt/shared"
            for _c in $_dirs $_leaf; do
                if [ ! -d "$_d/$_c" ]; then
                    inside "$_d" "$sharedp" || fail 3 "linked dir $_p: $_d resolves outside" \
                        "$dt/shared on $host; not creating $_c there"
                    mkdir "$_d/$_c" || fail 3 "cannot create $_d/$_c"
                fi
                _d="$_d/$_c"
            done
        fi ;;
    esac
    _d=$rel
    for _c in $_dirs; do
        _d="$_d/$_c"
        [ -L "$_d" ] && fail 3 "linked path $_p: $_d in release $release on $host is a" \
            "symlink; refusing to link through it"
        [ -d "$_d" ] || mkdir "$_d" || fail 3 "cannot create $_d"
    done
    inside "$_d" "$relp" || fail 3 "linked path $_p: $_d resolves outside release" \
        "$release on $host"
    _link="$_d/$_leaf"
    if [ -e "$_link" ] || [ -L "$_link" ]; then rm -rf "$_link" || fail 3 "cannot remove $_link"; fi
    ln -s "$_target" "$_link" || fail 3 "cannot link $_p into the release"
done
current_name
printf 'previous=%s\n' "$cur"
export DEPLOYD_RELEASE_PATH="$rel"
[ -n "$build_hook" ] && { run_hook build "$rel" "$build_hook" || exit 5; }
printf 'prepared=%s\n' "$release"
