use serde_json::json;

use super::*;
use crate::{blockdev_from_json, parse_blockdev, QapiError};

fn keyval(arg: &str) -> BlockdevOptions {
    parse_blockdev(arg).unwrap_or_else(|e| panic!("{arg}: {e}"))
}

fn json(value: serde_json::Value) -> BlockdevOptions {
    blockdev_from_json(&value).unwrap_or_else(|e| panic!("{value}: {e}"))
}

fn err(arg: &str) -> String {
    parse_blockdev(arg).unwrap_err().to_string()
}

fn json_err(value: serde_json::Value) -> String {
    blockdev_from_json(&value).unwrap_err().to_string()
}

fn file(filename: &str) -> BlockdevOptionsFile {
    BlockdevOptionsFile {
        filename: filename.into(),
        aio: BlockdevAioOptions::Threads,
        locking: OnOffAuto::Auto,
    }
}

#[test]
fn file_keyval_and_json_are_equal() {
    let k = keyval("file,filename=/x,aio=io_uring,cache.direct=on,locking=off,node-name=f0");
    let j = json(json!({
        "driver": "file", "filename": "/x", "aio": "io_uring",
        "cache": {"direct": true}, "locking": "off", "node-name": "f0"
    }));
    assert_eq!(k, j);
    let expected = BlockdevOptions {
        common: BlockdevCommon {
            node_name: Some("f0".into()),
            cache: BlockdevCacheOptions {
                direct: true,
                no_flush: false,
            },
            ..Default::default()
        },
        driver: BlockdevDriver::File(BlockdevOptionsFile {
            aio: BlockdevAioOptions::IoUring,
            locking: OnOffAuto::Off,
            ..file("/x")
        }),
    };
    assert_eq!(k, expected);
}

#[test]
fn raw_with_inline_child_keyval_and_json_are_equal() {
    let k = keyval("raw,file.driver=file,file.filename=/x,offset=1M,size=4k");
    let j = json(json!({
        "driver": "raw", "offset": 1048576, "size": 4096,
        "file": {"driver": "file", "filename": "/x"}
    }));
    assert_eq!(k, j);
    let child = BlockdevOptions {
        common: BlockdevCommon::default(),
        driver: BlockdevDriver::File(file("/x")),
    };
    let expected = BlockdevDriver::Raw(BlockdevOptionsRaw {
        file: BlockdevRef::Definition(Box::new(child)),
        offset: Some(Size(1 << 20)),
        size: Some(Size(4096)),
    });
    assert_eq!(k.driver, expected);
}

#[test]
fn raw_with_reference_keyval_and_json_are_equal() {
    let k = keyval("raw,file=f0");
    assert_eq!(k, json(json!({"driver": "raw", "file": "f0"})));
    let expected = BlockdevOptionsRaw {
        file: BlockdevRef::Reference("f0".into()),
        offset: None,
        size: None,
    };
    assert_eq!(k.driver, BlockdevDriver::Raw(expected));
}

#[test]
fn null_co_keyval_and_json_are_equal() {
    let k = keyval("null-co,size=1G,read-zeroes=on,latency-ns=100");
    let j = json(json!({
        "driver": "null-co", "size": 1073741824, "read-zeroes": true, "latency-ns": 100
    }));
    assert_eq!(k, j);
    let expected = BlockdevOptionsNull {
        size: Some(Size(1 << 30)),
        read_zeroes: true,
        latency_ns: 100,
    };
    assert_eq!(k.driver, BlockdevDriver::NullCo(expected));
}

#[test]
fn json_size_may_be_a_string_with_suffix() {
    let j = json(json!({"driver": "null-co", "size": "1G"}));
    assert_eq!(j, keyval("null-co,size=1G"));
}

#[test]
fn json_argument_string_parses_like_keyval() {
    let from_str = keyval(r#"{"driver":"raw","file":{"driver":"file","filename":"/x"}}"#);
    assert_eq!(from_str, keyval("raw,file.driver=file,file.filename=/x"));
}

#[test]
fn defaults_are_qemus() {
    let f = keyval("file,filename=/x");
    assert_eq!(f.common, BlockdevCommon::default());
    assert!(!f.common.read_only);
    assert_eq!(f.common.discard, BlockdevDiscardOptions::Ignore);
    assert_eq!(f.common.detect_zeroes, BlockdevDetectZeroesOptions::Off);
    assert_eq!(f.driver, BlockdevDriver::File(file("/x")));
    let n = keyval("null-co");
    assert_eq!(
        n.driver,
        BlockdevDriver::NullCo(BlockdevOptionsNull::default())
    );
}

#[test]
fn common_members_in_both_forms() {
    let k = keyval(
        "null-co,read-only=on,auto-read-only=true,discard=unmap,detect-zeroes=unmap,\
         cache.no-flush=on",
    );
    let j = json(json!({
        "driver": "null-co", "read-only": true, "auto-read-only": true, "discard": "unmap",
        "detect-zeroes": "unmap", "cache": {"no-flush": true}
    }));
    assert_eq!(k, j);
    assert!(k.common.read_only && k.common.auto_read_only && k.common.cache.no_flush);
}

#[test]
fn escaped_comma_in_filename() {
    let f = keyval("file,filename=a,,b");
    assert_eq!(f.driver, BlockdevDriver::File(file("a,b")));
}

#[test]
fn explicit_driver_key_works_too() {
    assert_eq!(
        keyval("driver=file,filename=/x"),
        keyval("file,filename=/x")
    );
}

#[test]
fn json_string_for_bool_is_a_type_error_but_keyval_on_works() {
    let e = json_err(json!({"driver": "null-co", "read-only": "on"}));
    assert_eq!(
        e,
        "Invalid parameter type for 'read-only', expected: boolean"
    );
    assert!(keyval("null-co,read-only=on").common.read_only);
}

#[test]
fn missing_member_names_its_path() {
    assert_eq!(err("file"), "Parameter 'filename' is missing");
    assert_eq!(
        err("raw,file.driver=file"),
        "Parameter 'file.filename' is missing"
    );
    assert_eq!(err("raw"), "Parameter 'file' is missing");
    assert_eq!(err("node-name=x"), "Parameter 'driver' is missing");
    assert_eq!(err(""), "Parameter 'driver' is missing");
    assert_eq!(
        err("raw,file.file.driver=file"),
        "Parameter 'file.driver' is missing"
    );
}

#[test]
fn unknown_member_names_its_path() {
    assert_eq!(err("file,filename=/x,foo=1"), "Invalid parameter 'foo'");
    assert_eq!(
        err("file,filename=/x,cache.bogus=on"),
        "Invalid parameter 'cache.bogus'"
    );
    assert_eq!(
        err("raw,file.driver=file,file.filename=/x,file.offset=1"),
        "Invalid parameter 'file.offset'"
    );
}

#[test]
fn bad_values_name_their_path() {
    assert_eq!(
        err("file,filename=/x,aio=foo"),
        "Parameter 'aio' does not accept value 'foo'"
    );
    assert_eq!(err("foo"), "Parameter 'driver' does not accept value 'foo'");
    assert_eq!(
        err("raw,file.driver=foo"),
        "Parameter 'file.driver' does not accept value 'foo'"
    );
    assert_eq!(
        err("null-co,read-only=yes"),
        "Parameter 'read-only' expects 'on' or 'off'"
    );
    assert_eq!(
        err("null-co,latency-ns=soon"),
        "Parameter 'latency-ns' expects a number"
    );
    assert_eq!(
        err("null-co,size=big"),
        "Parameter 'size' expects a non-negative number below 2^64 \
         (optional suffix k, M, G, T, P or E)"
    );
    assert_eq!(
        err("raw,file.driver=null-co,file.size=-1"),
        "Parameter 'file.size' expects a non-negative number below 2^64 \
         (optional suffix k, M, G, T, P or E)"
    );
}

#[test]
fn json_type_errors_name_their_path() {
    let e = |v| json_err(v);
    assert_eq!(
        e(json!({"driver": "null-co", "latency-ns": "1"})),
        "Invalid parameter type for 'latency-ns', expected: integer"
    );
    assert_eq!(
        e(json!({"driver": "null-co", "latency-ns": 1.5})),
        "Invalid parameter type for 'latency-ns', expected: integer"
    );
    assert_eq!(
        e(json!({"driver": 1})),
        "Invalid parameter type for 'driver', expected: string"
    );
    assert_eq!(
        e(json!({"driver": "file", "filename": 7})),
        "Invalid parameter type for 'filename', expected: string"
    );
    assert_eq!(
        e(json!({"driver": "null-co", "cache": true})),
        "Invalid parameter type for 'cache', expected: object"
    );
    assert_eq!(
        e(json!({"driver": "raw", "file": 3})),
        "Invalid parameter type for 'file', expected: BlockdevRef"
    );
    assert_eq!(
        e(json!({"driver": "raw", "file": {"driver": "null-co", "size": true}})),
        "Invalid parameter type for 'file.size', expected: size"
    );
    assert_eq!(
        e(json!({"driver": "null-co", "latency-ns": -1})),
        "Parameter 'latency-ns' expects u64"
    );
}

#[test]
fn errors_are_structured() {
    let e = parse_blockdev("raw,file.driver=file").unwrap_err();
    assert_eq!(
        e,
        QapiError::Missing {
            key: "file.filename".into()
        }
    );
    assert_eq!(e.key(), Some("file.filename"));
}

#[test]
fn deeply_nested_children_parse() {
    let arg = "raw,file.driver=raw,file.file.driver=raw,file.file.file.driver=null-co";
    let mut node = keyval(arg);
    let mut depth = 0;
    while let BlockdevDriver::Raw(BlockdevOptionsRaw {
        file: BlockdevRef::Definition(child),
        ..
    }) = node.driver
    {
        node = *child;
        depth += 1;
    }
    assert_eq!(depth, 3);
    assert_eq!(node.driver.name(), "null-co");
}

#[test]
fn options_deserialize_through_serde_json_too() {
    // A foreign deserializer: strict JSON typing, errors as its custom text.
    let text = r#"{"driver": "raw", "file": {"driver": "file", "filename": "/x"}}"#;
    let opts: BlockdevOptions = serde_json::from_str(text).unwrap();
    assert_eq!(opts, keyval("raw,file.driver=file,file.filename=/x"));
    let err = serde_json::from_str::<BlockdevOptions>(r#"{"driver": "file"}"#).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Parameter 'filename' is missing"),
        "{err}"
    );
}

#[test]
fn serialize_then_parse_round_trips() {
    let opts = keyval("raw,file.driver=file,file.filename=/x,file.aio=io_uring,offset=4k");
    let back = json(serde_json::to_value(&opts).unwrap());
    assert_eq!(back, opts);
}

#[test]
fn arbitrary_strings_never_panic() {
    use proptest::prelude::*;
    proptest!(|(arg in "[a-z.=,{}\"0-9-]{0,40}")| {
        let _ = parse_blockdev(&arg);
    });
    proptest!(|(arg in any::<String>())| {
        let _ = parse_blockdev(&arg);
    });
}

#[test]
fn deepest_nesting_allowed_does_not_exhaust_the_stack() {
    // Keyval: 30 levels of `file.`, the most MAX_DEPTH leaves room for.
    let mut arg = String::from("raw");
    for k in 1..=30 {
        let driver = if k == 30 { "null-co" } else { "raw" };
        arg += &format!(",{}driver={driver}", "file.".repeat(k));
    }
    assert_eq!(keyval(&arg).driver.name(), "raw");
    // JSON: serde_json stops at 128 levels; go near it.
    let mut value = json!({"driver": "null-co"});
    for _ in 0..120 {
        value = json!({"driver": "raw", "file": value});
    }
    assert_eq!(json(value).driver.name(), "raw");
}

#[test]
fn io_uring_keyval_and_json_are_equal() {
    let k = keyval("io_uring,filename=/x,cache.direct=on,read-only=on,num-queues=2");
    let j = json(json!({
        "driver": "io_uring", "filename": "/x", "cache": {"direct": true},
        "read-only": true, "num-queues": 2
    }));
    assert_eq!(k, j);
    assert!(k.common.cache.direct && k.common.read_only);
    let expected = BlockdevOptionsIoUring {
        filename: "/x".into(),
        num_queues: 2,
    };
    assert_eq!(k.driver, BlockdevDriver::IoUring(expected));
    assert_eq!(k.driver.name(), "io_uring");
}

#[test]
fn blkio_path_drivers_keyval_and_json_are_equal() {
    let drivers = [
        "nvme-io_uring",
        "virtio-blk-vhost-user",
        "virtio-blk-vhost-vdpa",
        "virtio-blk-vfio-pci",
    ];
    for driver in drivers {
        let k = keyval(&format!("{driver},path=/p,node-name=b0,num-queues=4"));
        let j = json(json!({
            "driver": driver, "path": "/p", "node-name": "b0", "num-queues": 4
        }));
        assert_eq!(k, j, "{driver}");
        assert_eq!(k.driver.name(), driver);
        assert_eq!(k.common.node_name.as_deref(), Some("b0"));
    }
}

#[test]
fn blkio_path_drivers_parse_into_their_own_types() {
    let path = |driver: &str| keyval(&format!("{driver},path=/p")).driver;
    assert_eq!(
        path("nvme-io_uring"),
        BlockdevDriver::NvmeIoUring(BlockdevOptionsNvmeIoUring {
            path: "/p".into(),
            num_queues: 1,
        })
    );
    assert_eq!(
        path("virtio-blk-vhost-user"),
        BlockdevDriver::VirtioBlkVhostUser(BlockdevOptionsVirtioBlkVhostUser {
            path: "/p".into(),
            num_queues: 1,
        })
    );
    assert_eq!(
        path("virtio-blk-vhost-vdpa"),
        BlockdevDriver::VirtioBlkVhostVdpa(BlockdevOptionsVirtioBlkVhostVdpa {
            path: "/p".into(),
            num_queues: 1,
        })
    );
    assert_eq!(
        path("virtio-blk-vfio-pci"),
        BlockdevDriver::VirtioBlkVfioPci(BlockdevOptionsVirtioBlkVfioPci {
            path: "/p".into(),
            num_queues: 1,
        })
    );
}

#[test]
fn blkio_drivers_take_only_their_own_members() {
    assert_eq!(err("io_uring"), "Parameter 'filename' is missing");
    assert_eq!(err("io_uring,path=/x"), "Invalid parameter 'path'");
    assert_eq!(err("virtio-blk-vhost-user"), "Parameter 'path' is missing");
    assert_eq!(
        err("virtio-blk-vhost-user,path=/s,filename=/x"),
        "Invalid parameter 'filename'"
    );
    assert_eq!(
        err("nvme-io_uring,path=/dev/ng0n1,aio=io_uring"),
        "Invalid parameter 'aio'"
    );
    assert_eq!(
        err("virtio-blk-vfio-pci,path=/p,num-queues=many"),
        "Parameter 'num-queues' expects a number"
    );
    assert_eq!(
        err("io-uring,filename=/x"),
        "Parameter 'driver' does not accept value 'io-uring'"
    );
    assert_eq!(
        json_err(json!({"driver": "virtio-blk-vhost-vdpa", "path": "/p", "num-queues": "2"})),
        "Invalid parameter type for 'num-queues', expected: integer"
    );
}

#[test]
fn blkio_driver_as_inline_raw_child() {
    let k = keyval("raw,file.driver=virtio-blk-vhost-user,file.path=/s,size=1M");
    let j = json(json!({
        "driver": "raw", "size": 1048576,
        "file": {"driver": "virtio-blk-vhost-user", "path": "/s"}
    }));
    assert_eq!(k, j);
    let back = json(serde_json::to_value(&k).unwrap());
    assert_eq!(back, k);
}

#[test]
fn host_device_is_qemus_name_for_file_on_a_block_device() {
    let k = keyval("driver=host_device,node-name=h0,filename=/dev/loop0,aio=io_uring");
    let f = keyval("driver=file,node-name=h0,filename=/dev/loop0,aio=io_uring");
    assert_eq!(k, f);
    let j = json(
        json!({"driver": "host_device", "node-name": "h0", "filename": "/dev/loop0", "aio": "io_uring"}),
    );
    assert_eq!(j, f);
}

#[test]
fn nbd_keyval_and_json_are_equal() {
    let k = keyval(
        "nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port=10809,\
         export=disk,reconnect-delay=5",
    );
    let j = json(json!({
        "driver": "nbd", "node-name": "n0",
        "server": {"type": "inet", "host": "127.0.0.1", "port": "10809"},
        "export": "disk", "reconnect-delay": 5
    }));
    assert_eq!(k, j);
    let BlockdevDriver::Nbd(n) = &k.driver else {
        panic!("not nbd: {k:?}");
    };
    assert_eq!(n.export.as_deref(), Some("disk"));
    assert_eq!(n.reconnect_delay, 5);
    assert_eq!(n.open_timeout, 0);
    let u = keyval("nbd,server.type=unix,server.path=/tmp/s");
    let BlockdevDriver::Nbd(n) = &u.driver else {
        panic!("not nbd: {u:?}");
    };
    assert_eq!(
        n.server,
        crate::export::SocketAddress::Unix {
            path: "/tmp/s".into()
        }
    );
    assert!(
        err("nbd,server.type=unix").contains("path"),
        "{}",
        err("nbd,server.type=unix")
    );
    assert!(err("nbd,server.type=unix,server.path=/s,bogus=1").contains("bogus"));
}
