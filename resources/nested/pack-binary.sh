#!/usr/bin/env bash
# Packs programs for L1 into an uncompressed cpio newc archive that the
# nested harness appends to L1's initrd:
#
#   resources/nested/pack-binary.sh OUT.cpio PROGRAM... [-- FILE...]
#
# Each PROGRAM lands in /bin under its own name, with debug info stripped
# (symbols stay, for backtraces); the shared libraries `ldd` names,
# including the dynamic loader, land at the paths ldd prints them under,
# symlinks resolved, and so does each data FILE (e.g. firmware).
# Idempotent: OUT.cpio.stamp records each input's path, size and mtime,
# and nothing is redone while they match. FORCE=1 repacks.
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
target=$1
shift
progs=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
    progs+=("$1")
    shift
done
[ $# -eq 0 ] || shift
files=("$@")
for prog in "${progs[@]}"; do
    [ -x "$prog" ] || { echo "pack-binary.sh: $prog is not an executable" >&2; exit 1; }
done
for file in "${files[@]}"; do
    [ -f "$file" ] || { echo "pack-binary.sh: $file is not a file" >&2; exit 1; }
done

stamp_text=$(for f in "${progs[@]}" -- "${files[@]}"; do
    [ "$f" != -- ] || { echo --; continue; }
    p=$(readlink -f "$f")
    echo "$f $p $(stat -c '%s %Y' "$p")"
done; stat -c '%Y' "$0")
if [ "${FORCE:-0}" != 1 ] && [ -s "$target" ] && [ "$(cat "$target.stamp" 2>/dev/null)" = "$stamp_text" ]; then
    exit 0
fi

stage=$(mktemp -d "$target.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin"
for prog in "${progs[@]}"; do
    name=$(basename "$prog")
    strip --strip-debug -o "$stage/bin/$name" "$prog"
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; a static program has none.
    for lib in $(ldd "$prog" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
done
for file in "${files[@]}"; do
    mkdir -p "$stage$(dirname "$file")"
    cp -L "$file" "$stage$file"
done

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$target.new"
mv "$target.new" "$target"
echo "$stamp_text" >"$target.stamp"
echo "pack-binary.sh: $target ($(stat -c %s "$target") bytes): ${progs[*]}"
