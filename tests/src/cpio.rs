//! A writer for the cpio "newc" format, just enough to put one file into
//! an archive that is appended to the guest's initramfs. The kernel
//! unpacks concatenated archives one after the other, so a later file
//! lands beside (or over) the earlier ones.

/// Alignment of the newc header, name and data.
const ALIGN: usize = 4;

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
/// relative to the root, no leading `/`) and the trailer.
pub(crate) fn archive(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ino, (name, mode, data)) in (1..).zip(files) {
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
}
