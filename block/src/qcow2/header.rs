//! The qcow2 header (QEMU's docs/interop/qcow2.txt): versions 2 and 3,
//! the header extensions blkvm reads (backing format, feature names,
//! external data file), and the checks that turn a hostile header into a
//! clear error before any table is read.

use std::fmt::Write as _;

use super::Qcow2Error;
use crate::node::{FormatSpecific, Qcow2V3Bits};

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header (and of the version 3 fields before
/// `incompatible_features`).
const V2_HEADER_LEN: usize = 72;
/// Smallest version 3 header.
const V3_HEADER_LEN: usize = 104;
/// Smallest and largest cluster sizes QEMU creates and opens.
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the backing file name.
const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's `QCOW_MAX_L1_SIZE`: 32 MiB of L1 table.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE`: 8 MiB of refcount table.
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bits.
const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// The only refcount width blkvm opens (refcount_order 4).
const REFCOUNT_BITS: u32 = 16;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offsets of header fields blkvm rewrites.
pub(crate) const OFF_SIZE: usize = 24;
pub(crate) const OFF_L1_SIZE: usize = 36;
pub(crate) const OFF_L1_OFFSET: usize = 40;
pub(crate) const OFF_REFTABLE_OFFSET: usize = 48;
pub(crate) const OFF_REFTABLE_CLUSTERS: usize = 56;
pub(crate) const OFF_AUTOCLEAR: usize = 88;

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CompressionType {
    /// Raw deflate (no zlib header), QEMU's default.
    Deflate,
    /// zstd frames.
    Zstd,
}

/// The parsed header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub compression: CompressionType,
    /// The backing file name as written in the image.
    pub backing_file: Option<String>,
    /// The backing format extension.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn corrupt(msg: String) -> Qcow2Error {
    Qcow2Error::Corrupt(msg)
}

impl Header {
    /// Parses the header from `buf`, the image's first bytes (at least the
    /// first cluster, or the whole file when it is smaller).
    pub fn parse(buf: &[u8]) -> Result<Header, Qcow2Error> {
        if buf.len() < V2_HEADER_LEN || be32(buf, 0) != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster size 2^{cluster_bits} is outside 512 B to 2 MiB"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_offset: be64(buf, 40),
            reftable_offset: be64(buf, 48),
            reftable_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            compression: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
        };
        let crypt = be32(buf, 32);
        if crypt != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "encrypted images (crypt_method {crypt})"
            )));
        }
        let mut header_len = V2_HEADER_LEN;
        let mut feature_table = Vec::new();
        if version == 3 {
            if buf.len() < V3_HEADER_LEN {
                return Err(corrupt("the version 3 header is truncated".into()));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            let refcount_order = be32(buf, 96);
            header_len = be32(buf, 100) as usize;
            if header_len < V3_HEADER_LEN || header_len as u64 > cluster_size {
                return Err(corrupt(format!("header length {header_len} is invalid")));
            }
            if header_len > buf.len() {
                return Err(corrupt(
                    "the header reaches past the end of the file".into(),
                ));
            }
            if refcount_order != 4 {
                return Err(Qcow2Error::Unsupported(format!(
                    "{}-bit refcounts (refcount_order {refcount_order}); only 16-bit refcounts are supported",
                    1u64.checked_shl(refcount_order).unwrap_or(0)
                )));
            }
            if h.incompatible & INCOMPAT_COMPRESSION != 0 {
                if header_len <= V3_HEADER_LEN {
                    return Err(corrupt(
                        "the compression type bit is set but the header has no compression type"
                            .into(),
                    ));
                }
                h.compression = match buf[V3_HEADER_LEN] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    t => {
                        return Err(Qcow2Error::Unsupported(format!("compression type {t}")));
                    }
                };
            }
        }
        h.read_extensions(buf, header_len, &mut feature_table)?;
        h.check_features(&feature_table)?;
        h.check_geometry()?;
        Ok(h)
    }

    fn read_extensions(
        &mut self,
        buf: &[u8],
        header_len: usize,
        feature_table: &mut Vec<(u8, u8, String)>,
    ) -> Result<(), Qcow2Error> {
        let cluster_size = 1usize << self.cluster_bits;
        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16);
        // Extensions end where the backing file name starts (or at the end
        // of the first cluster).
        let mut end = cluster_size.min(buf.len());
        if backing_offset != 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name length {backing_len} exceeds {MAX_BACKING_NAME}"
                )));
            }
            let name_end = backing_offset
                .checked_add(u64::from(backing_len))
                .filter(|e| *e <= cluster_size.min(buf.len()) as u64)
                .ok_or_else(|| {
                    corrupt("the backing file name lies outside the first cluster".into())
                })?;
            let start = backing_offset as usize;
            let name = &buf[start..name_end as usize];
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| corrupt("the backing file name is not UTF-8".into()))?;
            if !name.is_empty() {
                self.backing_file = Some(name);
            }
            end = end.min(start);
        }
        let mut at = header_len;
        while at + 8 <= end {
            let ty = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if ty == EXT_END {
                return Ok(());
            }
            let data_end = at
                .checked_add(len)
                .filter(|e| *e <= end)
                .ok_or_else(|| corrupt(format!("header extension {ty:#x} is too long")))?;
            let data = &buf[at..data_end];
            match ty {
                EXT_BACKING_FORMAT => {
                    let f = String::from_utf8(data.to_vec())
                        .map_err(|_| corrupt("the backing format is not UTF-8".into()))?;
                    self.backing_format = Some(f);
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..].split(|b| *b == 0).next().unwrap_or(&[]);
                        feature_table.push((e[0], e[1], String::from_utf8_lossy(name).into()));
                    }
                }
                EXT_DATA_FILE => {
                    return Err(Qcow2Error::Unsupported("external data files".into()));
                }
                _ => {}
            }
            at = data_end.next_multiple_of(8);
        }
        Ok(())
    }

    fn check_features(&self, table: &[(u8, u8, String)]) -> Result<(), Qcow2Error> {
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::Unsupported("external data files".into()));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Qcow2Error::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let mut names = String::new();
            for bit in (0..64).filter(|b| unknown & (1u64 << b) != 0) {
                let name = table
                    .iter()
                    .find(|(ty, b, _)| *ty == 0 && u32::from(*b) == bit)
                    .map_or_else(
                        || format!("Unknown incompatible feature: {bit}"),
                        |f| f.2.clone(),
                    );
                if !names.is_empty() {
                    names.push_str(", ");
                }
                let _ = write!(names, "{name}");
            }
            return Err(Qcow2Error::Unsupported(format!("qcow2 features: {names}")));
        }
        Ok(())
    }

    fn check_geometry(&self) -> Result<(), Qcow2Error> {
        let cluster_size = 1u64 << self.cluster_bits;
        let misaligned = |off: u64| off & (cluster_size - 1) != 0;
        if misaligned(self.l1_offset) {
            return Err(corrupt(format!(
                "L1 table offset {:#x} is not cluster aligned",
                self.l1_offset
            )));
        }
        if misaligned(self.reftable_offset) || self.reftable_offset == 0 {
            return Err(corrupt(format!(
                "refcount table offset {:#x} is invalid",
                self.reftable_offset
            )));
        }
        let reftable_bytes = u64::from(self.reftable_clusters) << self.cluster_bits;
        if self.reftable_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters is invalid",
                self.reftable_clusters
            )));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries is too large",
                self.l1_size
            )));
        }
        if self
            .l1_offset
            .checked_add(u64::from(self.l1_size) * 8)
            .is_none()
            || self.reftable_offset.checked_add(reftable_bytes).is_none()
        {
            return Err(corrupt("a table reaches past the largest offset".into()));
        }
        if u64::from(self.l1_size) < l1_entries_for(self.size, self.cluster_bits) {
            return Err(corrupt(format!(
                "L1 table of {} entries is too small for {} bytes",
                self.l1_size, self.size
            )));
        }
        Ok(())
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// QEMU's `ImageInfoSpecificQCow2` of this header.
    pub fn format_specific(&self) -> FormatSpecific {
        FormatSpecific::Qcow2 {
            compat: if self.version == 2 { "0.10" } else { "1.1" },
            compression_type: match self.compression {
                CompressionType::Deflate => "zlib",
                CompressionType::Zstd => "zstd",
            },
            refcount_bits: REFCOUNT_BITS,
            v3: (self.version == 3).then_some(Qcow2V3Bits {
                lazy_refcounts: self.compatible & COMPAT_LAZY_REFCOUNTS != 0,
                corrupt: self.incompatible & INCOMPAT_CORRUPT != 0,
                extended_l2: self.incompatible & INCOMPAT_EXTL2 != 0,
            }),
        }
    }

    /// Whether the image may be written as it stands.
    pub fn writable_check(&self) -> Result<(), Qcow2Error> {
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Qcow2Error::Unsupported(
                "writing an image marked corrupt; repair it with 'qemu-img check -r all'".into(),
            ));
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(Qcow2Error::Unsupported(
                "writing a dirty image (its lazy refcounts need repair: 'qemu-img check -r all')"
                    .into(),
            ));
        }
        if self.nb_snapshots != 0 {
            return Err(Qcow2Error::Unsupported(
                "writing an image with internal snapshots".into(),
            ));
        }
        Ok(())
    }
}

/// L1 entries needed to map `size` bytes with clusters of `1 << cluster_bits`.
pub(crate) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    // Each L2 table maps cluster_size / 8 clusters.
    let shift = cluster_bits + (cluster_bits - 3);
    size.div_ceil(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(cluster_bits: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1 << cluster_bits];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << cluster_bits).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << cluster_bits).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    #[test]
    fn a_minimal_v3_header_parses() {
        let h = Header::parse(&v3(16)).unwrap();
        assert_eq!((h.version, h.cluster_size(), h.size), (3, 65536, 1 << 20));
    }

    #[test]
    fn refcount_order_other_than_4_is_refused_by_width() {
        let mut b = v3(16);
        b[96..100].copy_from_slice(&5u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("32-bit refcounts"), "{e}");
    }

    #[test]
    fn encryption_and_extended_l2_are_refused_clearly() {
        let mut b = v3(16);
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert!(Header::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("encrypted"));
        let mut b = v3(16);
        b[72..80].copy_from_slice(&INCOMPAT_EXTL2.to_be_bytes());
        assert!(Header::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("subclusters"));
    }

    #[test]
    fn cluster_bits_out_of_range_are_refused() {
        for bits in [8u32, 22, 0xffff_ffff] {
            let mut b = v3(16);
            b[20..24].copy_from_slice(&bits.to_be_bytes());
            assert!(Header::parse(&b).is_err(), "{bits}");
        }
    }

    #[test]
    fn an_overlong_extension_is_an_error_not_a_panic() {
        let mut b = v3(9);
        b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("too long"));
    }

    #[test]
    fn unknown_incompatible_features_are_named() {
        let mut b = v3(16);
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let e = Header::parse(&b).unwrap_err().to_string();
        assert!(e.contains("Unknown incompatible feature: 9"), "{e}");
    }
}
