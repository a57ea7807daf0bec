//! Compressed clusters: raw deflate (QEMU's default, no zlib header) and
//! zstd. A compressed cluster decompresses to exactly one cluster; the
//! stored length is rounded up to sectors, so trailing bytes are ignored.

use super::header::CompressionType;
use super::Qcow2Error;

/// Decompresses `src` into all of `out`.
pub(crate) fn decompress(
    ty: CompressionType,
    src: &[u8],
    out: &mut [u8],
) -> Result<(), Qcow2Error> {
    let bad = |why: String| Qcow2Error::Corrupt(format!("a compressed cluster is invalid: {why}"));
    match ty {
        CompressionType::Deflate => {
            let mut d = flate2::Decompress::new(false);
            d.decompress(src, out, flate2::FlushDecompress::Finish)
                .map_err(|e| bad(e.to_string()))?;
            if d.total_out() != out.len() as u64 {
                return Err(bad("it is shorter than a cluster".into()));
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| bad(e.to_string()))?;
            let mut input = InBuffer::around(src);
            let mut output = OutBuffer::around(out);
            loop {
                let hint = d
                    .run(&mut input, &mut output)
                    .map_err(|e| bad(e.to_string()))?;
                let full = output.pos() == output.capacity();
                if full {
                    break;
                }
                if hint == 0 || input.pos() == src.len() {
                    return Err(bad("it is shorter than a cluster".into()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn raw_deflate_round_trips_with_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let mut z = e.finish().unwrap();
        z.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Deflate, &z, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_round_trips_and_garbage_is_an_error() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 11) as u8).collect();
        let mut z = zstd::bulk::compress(&data, 3).unwrap();
        z.extend_from_slice(&[0; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &z, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zstd, &[1, 2, 3], &mut out).is_err());
        assert!(decompress(CompressionType::Deflate, &[0xff; 8], &mut out).is_err());
    }
}
