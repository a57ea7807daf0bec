//! The `qcow2` driver reading images made by QEMU's own tools: versions 2
//! and 3, cluster sizes from 512 B to 2 MiB, zero clusters, compressed
//! clusters (deflate and zstd), backing chains (qcow2 and raw bases,
//! relative names, `backing=null`), and the refusals of what blkvm does
//! not support. What blkvm reads must equal `qemu-img convert -O raw`.

mod common;
mod qcow2_util;

use block::{children_with_roles, BlockStatus, ChildRole, FormatSpecific};
use qcow2_util::{open, qemu_img, qemu_io, raw_of, read_all, Scratch};

/// Makes an image with data, zeroes and holes in it, in the given format
/// options, and checks blkvm reads what QEMU reads.
fn reads_like_qemu(opts: &str, size: u64) {
    let s = Scratch::new();
    let img = s.path("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        &img,
        &size.to_string(),
    ]);
    let third = size / 3;
    qemu_io(
        &img,
        &[
            &format!("write -P 0x11 0 {}", 3 * 512),
            &format!("write -P 0x22 {} 70000", third + 1024),
            &format!("write -P 0x33 {} 5000", size - 5000 - 512),
            &format!("write -z {} 8192", third + 4096),
            &format!("write -P 0x44 {} 131072", 2 * third),
            &format!("write -z {} 65536", 2 * third),
        ],
    );
    let expected = raw_of(&s, &img);
    let mut d = open(&format!(
        "qcow2,node-name=q0,file.driver=file,file.filename={img}"
    ));
    assert_eq!(d.node.capacity(), size);
    let got = read_all(&mut d, size);
    assert!(got == expected, "{opts}: data differs from QEMU's");
}

#[test]
fn v3_images_of_every_cluster_size_read_like_qemu() {
    for cs in ["512", "4k", "64k", "2M"] {
        reads_like_qemu(&format!("compat=1.1,cluster_size={cs}"), 8 << 20);
    }
}

#[test]
fn v2_images_read_like_qemu() {
    for cs in ["512", "64k"] {
        reads_like_qemu(&format!("compat=0.10,cluster_size={cs}"), 6 << 20);
    }
}

#[test]
fn compressed_images_read_like_qemu_with_both_compression_types() {
    for ty in ["zlib", "zstd"] {
        for cs in ["4k", "64k"] {
            let s = Scratch::new();
            let raw = s.path("src.raw");
            let data: Vec<u8> = (0..(4u32 << 20))
                .map(|i| {
                    if (i >> 16) % 3 == 0 {
                        0
                    } else {
                        (i % 251) as u8 ^ (i >> 12) as u8
                    }
                })
                .collect();
            std::fs::write(&raw, &data).unwrap();
            let img = s.path("c.qcow2");
            qemu_img(&[
                "convert",
                "-q",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ty},cluster_size={cs}"),
                &raw,
                &img,
            ]);
            let mut d = open(&format!(
                "qcow2,node-name=q0,file.driver=file,file.filename={img}"
            ));
            let got = read_all(&mut d, data.len() as u64);
            assert!(got == data, "{ty} {cs}: compressed data differs");
        }
    }
}

#[test]
fn a_three_level_chain_with_relative_names_reads_like_qemu() {
    let s = Scratch::new();
    let size = 4u64 << 20;
    let base = s.path("base.raw");
    let data: Vec<u8> = (0..size as u32).map(|i| (i * 7 % 253) as u8 | 1).collect();
    std::fs::write(&base, &data).unwrap();
    let mid = s.path("mid.qcow2");
    let top = s.path("top.qcow2");
    // Relative backing names, resolved against each image's directory.
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &mid,
    ]);
    qemu_io(
        &mid,
        &["write -P 0x55 65536 100000", "write -z 1048576 65536"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    qemu_io(&top, &["write -P 0x66 70000 5000", "write -z 2002944 4096"]);
    let expected = raw_of(&s, &top);
    let mut d = open(&format!(
        "qcow2,node-name=q0,file.driver=file,file.filename={top}"
    ));
    assert_eq!(read_all(&mut d, size), expected);
    // The chain is in the graph: top, its file, mid, mid's file, base...
    let names: Vec<&str> = d.graph.nodes().map(|(_, n)| n.driver()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "qcow2").count(),
        2,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "raw").count(),
        1,
        "{names:?}"
    );
    // Roles: the file child, then the backing child, down the chain.
    let roles: Vec<(ChildRole, &str)> = children_with_roles(d.node.as_ref())
        .into_iter()
        .map(|(r, c)| (r, c.driver()))
        .collect();
    assert_eq!(
        roles,
        [(ChildRole::File, "file"), (ChildRole::Backing, "qcow2")]
    );
    let mid_node = d.node.backing().expect("top has a backing node");
    assert_eq!(mid_node.filename(), Some(mid.as_str()));
    let base_node = mid_node.backing().expect("mid has a backing node");
    assert_eq!(base_node.driver(), "raw");
    assert!(base_node.backing().is_none());
    // What QMP's ImageInfo shows of the header.
    let details = d.node.image_details().expect("qcow2 has image details");
    assert_eq!(details.cluster_size, Some(4096));
    assert_eq!(details.backing_filename.as_deref(), Some("mid.qcow2"));
    assert_eq!(details.full_backing_filename.as_deref(), Some(mid.as_str()));
    assert_eq!(details.backing_format.as_deref(), Some("qcow2"));
    assert!(matches!(
        details.specific,
        Some(FormatSpecific::Qcow2 {
            compat: "1.1",
            v3: Some(_),
            ..
        })
    ));
    // Status: allocated in top; a zero cluster is a hole, as QEMU says.
    assert_eq!(
        d.node.block_status(65536 + 4096, 1).unwrap().1,
        BlockStatus::Data
    );
    assert_eq!(
        d.node.block_status(2002944, 4096).unwrap(),
        (4096, BlockStatus::Hole)
    );
}

#[test]
fn backing_null_reads_unallocated_clusters_as_zeroes() {
    let s = Scratch::new();
    let base = s.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]);
    qemu_io(&base, &["write -P 0x77 0 1M"]);
    let top = s.path("top.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    qemu_io(&top, &["write -P 0x78 0 512"]);
    let mut d = open(&format!(
        "qcow2,node-name=q0,backing=null,file.driver=file,file.filename={top}"
    ));
    let got = read_all(&mut d, 1 << 20);
    assert!(got[..512].iter().all(|b| *b == 0x78));
    // The rest of the first cluster was copied from the base on write.
    assert!(got[512..65536].iter().all(|b| *b == 0x77));
    assert!(got[65536..].iter().all(|b| *b == 0));
    assert_eq!(d.node.children().len(), 1);
}

#[test]
fn unsupported_images_are_refused_naming_the_feature() {
    let cases = [
        ("refcount_bits=32", "32-bit refcounts"),
        ("extended_l2=on", "subclusters"),
        ("refcount_bits=1", "1-bit refcounts"),
    ];
    for (opt, words) in cases {
        let s = Scratch::new();
        let img = s.path("u.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opt, &img, "1M"]);
        let mut g = block::BlockGraph::new();
        let e = g
            .add(
                &qapi::parse_blockdev(&format!("qcow2,file.driver=file,file.filename={img}"))
                    .unwrap(),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains(words), "{opt}: {e}");
    }
}

#[test]
fn a_raw_file_is_not_taken_for_qcow2() {
    let s = Scratch::new();
    let img = s.path("r.raw");
    std::fs::write(&img, vec![0u8; 65536]).unwrap();
    let mut g = block::BlockGraph::new();
    let e = g
        .add(&qapi::parse_blockdev(&format!("qcow2,file.driver=file,file.filename={img}")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not in qcow2 format"), "{e}");
}
