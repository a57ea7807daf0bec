//! Fuzzes every option parser the command line and QMP reach: keyval and
//! JSON `--blockdev` / `blockdev-add`, `--export`, `--nbd-server`,
//! `--object`, `--device`, `--chardev`, `--monitor`, `--qmp`, sizes and
//! the raw keyval tree. The first byte picks the parser, the rest is the
//! argument.
//!
//! No input may panic, and every error must print. What parses must also
//! survive a round trip: the typed options serialized to JSON and read
//! back with the strict JSON typing must give the same options, so the
//! keyval and JSON forms cannot drift apart.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use qapi::device::DeviceOptions;
use qapi::export::{BlockExportOptions, NbdServerOptions};
use qapi::qmp::{ChardevSocketOptions, MonitorOptions};
use qapi::{BlockdevOptions, QapiError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Drops `null` members: `Serialize` writes an absent optional member as
/// `null`, which QEMU's strict JSON typing (and ours) refuses.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn to_json<T: Serialize>(t: &T) -> Value {
    let mut v = serde_json::to_value(t).expect("typed options serialize");
    strip_nulls(&mut v);
    v
}

/// An error must print and name its key without panicking.
fn check_error(e: &QapiError) {
    let _ = e.to_string();
    let _ = e.key();
}

/// Parses `arg` as `T` with `parse` and, when it parses, checks that the
/// JSON form of the result reads back as the same `T`.
fn round_trip<T>(arg: &str, parse: impl Fn(&str) -> Result<T, QapiError>)
where
    T: Serialize + PartialEq + Debug,
{
    match parse(arg) {
        Ok(t) => {
            let json = to_json(&t).to_string();
            let back =
                parse(&json).unwrap_or_else(|e| panic!("{t:?} as JSON {json} does not parse: {e}"));
            assert_eq!(back, t, "JSON form {json}");
        }
        Err(e) => check_error(&e),
    }
}

fn option<T: Serialize + DeserializeOwned + PartialEq + Debug>(arg: &str, implied: Option<&str>) {
    round_trip(arg, |a| qapi::parse_option_as::<T>(a, implied));
}

fn blockdev(arg: &str) {
    round_trip(arg, qapi::parse_blockdev);
    // The QMP path: a JSON value, read by blockdev_from_json.
    if let Ok(json) = serde_json::from_str::<Value>(arg) {
        match qapi::blockdev_from_json(&json) {
            Ok(o) => {
                let back = qapi::blockdev_from_json(&to_json(&o)).expect("round trip");
                assert_eq!(back, o);
                // The command line's JSON form reads the same.
                let cli: BlockdevOptions = qapi::parse_blockdev(arg).expect("same as QMP");
                assert_eq!(cli, o);
            }
            Err(e) => check_error(&e),
        }
    }
}

fn keyval_tree(arg: &str, implied: Option<&str>) {
    match qapi::keyval::parse(arg, implied) {
        Ok(map) => {
            // Every key holds a subtree no deeper than the limit allows.
            fn depth(v: &qapi::Value) -> usize {
                match v {
                    qapi::Value::Map(m) => 1 + m.values().map(depth).max().unwrap_or(0),
                    qapi::Value::List(l) => 1 + l.iter().map(depth).max().unwrap_or(0),
                    _ => 0,
                }
            }
            let d = map.values().map(depth).max().unwrap_or(0);
            assert!(d < qapi::keyval::MAX_DEPTH, "depth {d}");
        }
        Err(e) => check_error(&e),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let arg = String::from_utf8_lossy(rest);
    let arg = arg.as_ref();
    match which % 12 {
        0 => blockdev(arg),
        1 => option::<BlockExportOptions>(arg, Some("type")),
        2 => option::<NbdServerOptions>(arg, None),
        3 => round_trip(arg, qapi::object::parse_object),
        4 => round_trip(arg, qapi::device::parse_device),
        5 => {
            // No Serialize: parse only.
            if let Err(e) = qapi::parse_option_as::<ChardevSocketOptions>(arg, Some("backend")) {
                check_error(&e);
            }
            if let Err(e) = qapi::parse_option_as::<MonitorOptions>(arg, Some("chardev")) {
                check_error(&e);
            }
        }
        6 => {
            let _ = vmm::qmp::parse_qmp_arg(arg).map_err(|e| format!("{e:#}"));
        }
        7 => {
            // `--chardev` / `--monitor` pairs, split at a newline.
            let (c, m) = arg.split_once('\n').unwrap_or((arg, ""));
            let _ = vmm::qmp::monitors_from_chardevs(&[c.to_owned()], &[m.to_owned()])
                .map_err(|e| format!("{e:#}"));
        }
        8 => match qapi::parse_size(arg) {
            Ok(n) => {
                // A plain number reads back as itself.
                assert_eq!(qapi::parse_size(&n.to_string()).ok(), Some(n));
            }
            Err(e) => {
                let _ = e.to_string();
            }
        },
        9 => keyval_tree(arg, None),
        10 => keyval_tree(arg, Some("driver")),
        _ => option::<DeviceOptions>(arg, Some("driver")),
    }
});
