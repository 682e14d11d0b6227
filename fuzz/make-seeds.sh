#!/usr/bin/env bash
# Regenerates fuzz/seeds/baseline_decode/ with the real CLI, from tiny trees that hold what a
# baseline must describe: a symlink (also a dangling one and a loop), FIFOs, a hard link,
# extended attributes, setuid, non-UTF-8 and control-character names, names that sort
# differently in byte and tree order, implicit (policy-excluded) parent directories and an
# unhashed (too large) file, and a dpkg database (packages in the header, owners on entries). Signs them with a NEW key and prints the Rust constant to paste
# into fuzz_targets/baseline_decode.rs as SEED_KEY (and writes seeds/fuzz-signing-key.pub).
#
# Usage: fuzz/make-seeds.sh   (needs setfattr, mkfifo; builds target/debug/driftwatch-agent)
#   DW=/path/to/driftwatch-agent to use a built binary; SEEDS_DIR=DIR to write elsewhere.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seeds="${SEEDS_DIR:-$root/fuzz/seeds}"
out="$seeds/baseline_decode"
if [ -z "${DW:-}" ]; then
    cargo build -p driftwatch-agent --manifest-path "$root/Cargo.toml"
fi
dw="${DW:-$root/target/debug/driftwatch-agent}"
t="$(mktemp -d)"
trap 'rm -rf "$t"' EXIT
cd "$t"
"$dw" keygen --out "$t/k" >/dev/null

mkdir -p t1/etc && echo root >t1/etc/passwd
mkdir -p t2/etc/ssh t2/usr/bin t2/var/log t2/a.b t2/a/b
echo hello >t2/etc/hostname
printf 'x%.0s' {1..100} >t2/usr/bin/tool && chmod 4755 t2/usr/bin/tool
ln -s ../etc/hostname t2/usr/link && ln -s /nonexistent/target t2/dangling
mkfifo t2/var/log/fifo
echo data >t2/etc/ssh/sshd_config
setfattr -n user.a -v b t2/etc/ssh/sshd_config
setfattr -n user.bin -v 0sAAEC/w== t2/etc/hostname
touch "t2/$(printf 'bad\xff\xfename')" "t2/$(printf 'nl\nname')" "t2/$(printf 'esc\x1b[31m')"
mkdir "t2/$(printf 'dir\x80')" && echo z >"t2/$(printf 'dir\x80')/f"
touch t2/a.b/x t2/a/b/y t2/a-z
mkdir t3
mkdir t4 && ln -s . t4/self && mkfifo t4/p && echo q >t4/f && ln t4/f t4/h
setfattr -n user.long -v "$(head -c 300 /dev/zero | tr '\0' v)" t4/f

# A Debian root: a dpkg inventory in the header and package owners on entries.
mkdir -p t5/var/lib/dpkg/info t5/usr/bin t5/etc/foo t5/usr/share/doc/bar
echo '#!/bin/sh' >t5/usr/bin/foo && chmod 755 t5/usr/bin/foo
echo 'conf=1' >t5/etc/foo/foo.conf
echo doc >t5/usr/share/doc/bar/README
md5() { md5sum <"$1" | cut -d' ' -f1; }
cat >t5/var/lib/dpkg/status <<EOF
Package: foo
Status: install ok installed
Priority: optional
Section: utils
Installed-Size: 12
Maintainer: X <x@example.org>
Architecture: amd64
Version: 1.2-3
Conffiles:
 /etc/foo/foo.conf $(md5 t5/etc/foo/foo.conf)
Description: foo tool
 Long text.

Package: bar
Status: install ok installed
Architecture: all
Multi-Arch: foreign
Version: 2:0.9~rc1
Description: bar docs

EOF
printf '/.\n/usr\n/usr/bin\n/usr/bin/foo\n/etc\n/etc/foo\n/etc/foo/foo.conf\n' >t5/var/lib/dpkg/info/foo.list
printf '%s  usr/bin/foo\n' "$(md5 t5/usr/bin/foo)" >t5/var/lib/dpkg/info/foo.md5sums
printf '/.\n/usr\n/usr/share\n/usr/share/doc\n/usr/share/doc/bar\n/usr/share/doc/bar/README\n' >t5/var/lib/dpkg/info/bar.list
printf '%s  usr/share/doc/bar/README\n' "$(md5 t5/usr/share/doc/bar/README)" >t5/var/lib/dpkg/info/bar.md5sums

printf 'base = "empty"\n' >empty.toml
printf 'base = "empty"\n[[rule]]\npaths = ["/**"]\nseverity = "high"\n' >small.toml
printf 'base = "empty"\n[paths]\ninclude = ["/etc/**", "/usr/**"]\nexclude = ["/usr/link"]\n[scan]\nmax_hash_size = "64 B"\n' >inc.toml

mk() { "$dw" baseline create --sign-key k.key --out "$out/$1" "${@:2}" >/dev/null; }
rm -f "$out"/*.dwb
mk s1_tiny_default_policy.dwb --root t1 --image-id x --image-version 1
mk s2_tiny_empty_policy_expires.dwb --root t1 --image-id x --image-version 1 --policy empty.toml --expires 3650d
mk s3_hostile_tree.dwb --root t2 --image-id web --image-version 2026.11.1 --policy small.toml
mk s4_empty_root.dwb --root t3 --image-id x --image-version 1 --policy empty.toml
mk s5_symlink_fifo_xattr.dwb --root t4 --image-id x --image-version 1 --policy empty.toml
mk s6_hostile_tree_default_policy.dwb --root t2 --image-id web --image-version 2
mk s7_implicit_dirs_unhashed.dwb --root t2 --image-id x --image-version 1 --policy inc.toml 2>/dev/null
mk s8_dpkg_packages.dwb --root t5 --image-id deb --image-version 1 --policy empty.toml
cp k.pub "$seeds/fuzz-signing-key.pub"
ls -l "$out"
echo "const SEED_KEY: [u8; 32] = ["
grep -v -- ----- k.pub | base64 -d | tail -c 32 | od -An -tx1 -v | sed -E 's/ ([0-9a-f]{2})/ 0x\1,/g'
echo "];"
