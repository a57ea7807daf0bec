//! A writer for the cpio "newc" format, just enough to put a few files
//! into an archive that is appended to the guest's initramfs. The kernel
//! unpacks concatenated archives one after the other, so a later file
//! lands beside (or over) the earlier ones. The kernel's unpacker does not
//! make missing parent directories, so the archive holds an entry for each
//! (one that exists already is left as it is).

use std::collections::BTreeSet;

/// Alignment of the newc header, name and data.
const ALIGN: usize = 4;
/// Where the next archive of an initrd starts: the kernel skips zeros
/// between archives, and an uncompressed one must start 4-byte aligned;
/// QEMU's tools and ours pad to 512.
const ARCHIVE_ALIGN: usize = 512;

/// Pads an initrd with zeros so that an archive appended to it starts
/// where the kernel looks for one.
pub(crate) fn pad_for_next_archive(initrd: &mut Vec<u8>) {
    initrd.resize(initrd.len().next_multiple_of(ARCHIVE_ALIGN), 0);
}

/// Appends one newc entry (header, NUL-terminated name, data) to `out`.
fn entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        u32::try_from(data.len()).expect("cpio entry over 4 GiB"),
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        u32::try_from(name.len() + 1).expect("cpio name over 4 GiB"),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
    out.extend_from_slice(data);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(ALIGN), 0);
}

/// A newc archive holding regular files `(path, mode, data)` (paths
/// relative to the root, no leading `/`), each after entries for its
/// parent directories, and the trailer.
pub(crate) fn archive(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dirs = BTreeSet::new();
    let mut ino = 0;
    for (name, mode, data) in files {
        for (i, _) in name.match_indices('/') {
            let dir = &name[..i];
            if !dir.is_empty() && dirs.insert(dir) {
                ino += 1;
                entry(&mut out, ino, 0o040_755, dir, &[]);
            }
        }
        ino += 1;
        entry(&mut out, ino, 0o100_000 | mode, name, data);
    }
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_entries_are_aligned_and_end_with_the_trailer() {
        let out = archive(&[("test.sh", 0o755, b"echo hi\n")]);

        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % ALIGN, 0);
        // Header (110 bytes), "test.sh\0" (8) padded to 120, data (8),
        // then the trailer's header.
        assert_eq!(&out[110..120], b"test.sh\0\0\0");
        assert_eq!(&out[120..128], b"echo hi\n");
        assert_eq!(&out[128..134], b"070701");
        let trailer = b"TRAILER!!!\0";
        assert!(out.windows(trailer.len()).any(|w| w == trailer));
    }

    /// The names of an archive's entries, with their modes.
    fn names(archive: &[u8]) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < archive.len() {
            let field = |i: usize| {
                let text = std::str::from_utf8(&archive[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                usize::from_str_radix(text, 16).unwrap()
            };
            let (mode, size, name_len) = (field(1), field(6), field(11));
            let name = &archive[at + 110..at + 110 + name_len - 1];
            out.push((String::from_utf8(name.to_vec()).unwrap(), mode as u32));
            at = (at + 110 + name_len).next_multiple_of(ALIGN);
            at = (at + size).next_multiple_of(ALIGN);
        }
        out
    }

    #[test]
    fn archive_makes_each_parent_directory_once_before_its_files() {
        let out = archive(&[
            ("l2/initrd", 0o644, b"x"),
            ("l2/sub/a", 0o644, b""),
            ("top", 0o755, b"y"),
        ]);

        assert_eq!(
            names(&out),
            [
                ("l2".to_owned(), 0o040_755),
                ("l2/initrd".to_owned(), 0o100_644),
                ("l2/sub".to_owned(), 0o040_755),
                ("l2/sub/a".to_owned(), 0o100_644),
                ("top".to_owned(), 0o100_755),
                ("TRAILER!!!".to_owned(), 0),
            ]
        );
    }

    #[test]
    fn pad_for_next_archive_reaches_a_512_byte_boundary() {
        let mut initrd = vec![1; 513];

        pad_for_next_archive(&mut initrd);

        assert_eq!(initrd.len(), 1024);
        assert!(initrd[513..].iter().all(|&b| b == 0));
    }
}
