//! Throttling options: QEMU's `ThrottleLimits` (qapi/block-core.json),
//! the members of `--object throttle-group` (as `limits.*` or the legacy
//! `x-*` names) and of QMP `block_set_io_throttle`.

use serde::{Deserialize, Serialize};

/// `ThrottleLimits`: every member optional; absent means unchanged (for
/// QMP) or unlimited (at creation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleLimits {
    /// Average read and write limit (operations per second).
    pub iops_total: Option<u64>,
    /// Burst rate of `iops-total` (operations per second).
    pub iops_total_max: Option<u64>,
    /// Seconds the `iops-total-max` burst may last.
    pub iops_total_max_length: Option<u64>,
    /// Average read limit (operations per second).
    pub iops_read: Option<u64>,
    /// Burst rate of `iops-read` (operations per second).
    pub iops_read_max: Option<u64>,
    /// Seconds the `iops-read-max` burst may last.
    pub iops_read_max_length: Option<u64>,
    /// Average write limit (operations per second).
    pub iops_write: Option<u64>,
    /// Burst rate of `iops-write` (operations per second).
    pub iops_write_max: Option<u64>,
    /// Seconds the `iops-write-max` burst may last.
    pub iops_write_max_length: Option<u64>,
    /// Average read and write limit (bytes per second).
    pub bps_total: Option<u64>,
    /// Burst rate of `bps-total` (bytes per second).
    pub bps_total_max: Option<u64>,
    /// Seconds the `bps-total-max` burst may last.
    pub bps_total_max_length: Option<u64>,
    /// Average read limit (bytes per second).
    pub bps_read: Option<u64>,
    /// Burst rate of `bps-read` (bytes per second).
    pub bps_read_max: Option<u64>,
    /// Seconds the `bps-read-max` burst may last.
    pub bps_read_max_length: Option<u64>,
    /// Average write limit (bytes per second).
    pub bps_write: Option<u64>,
    /// Burst rate of `bps-write` (bytes per second).
    pub bps_write_max: Option<u64>,
    /// Seconds the `bps-write-max` burst may last.
    pub bps_write_max_length: Option<u64>,
    /// A request larger than this counts as several operations (bytes).
    pub iops_size: Option<u64>,
}

/// `qom-type=throttle-group` members (QEMU's `ThrottleGroupProperties`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleGroupProperties {
    /// The limits.
    #[serde(default)]
    pub limits: Option<ThrottleLimits>,
    /// Average read and write limit (operations per second).
    #[serde(rename = "x-iops-total")]
    pub x_iops_total: Option<u64>,
    /// Burst rate of `iops-total` (operations per second).
    #[serde(rename = "x-iops-total-max")]
    pub x_iops_total_max: Option<u64>,
    /// Seconds the `iops-total-max` burst may last.
    #[serde(rename = "x-iops-total-max-length")]
    pub x_iops_total_max_length: Option<u64>,
    /// Average read limit (operations per second).
    #[serde(rename = "x-iops-read")]
    pub x_iops_read: Option<u64>,
    /// Burst rate of `iops-read` (operations per second).
    #[serde(rename = "x-iops-read-max")]
    pub x_iops_read_max: Option<u64>,
    /// Seconds the `iops-read-max` burst may last.
    #[serde(rename = "x-iops-read-max-length")]
    pub x_iops_read_max_length: Option<u64>,
    /// Average write limit (operations per second).
    #[serde(rename = "x-iops-write")]
    pub x_iops_write: Option<u64>,
    /// Burst rate of `iops-write` (operations per second).
    #[serde(rename = "x-iops-write-max")]
    pub x_iops_write_max: Option<u64>,
    /// Seconds the `iops-write-max` burst may last.
    #[serde(rename = "x-iops-write-max-length")]
    pub x_iops_write_max_length: Option<u64>,
    /// Average read and write limit (bytes per second).
    #[serde(rename = "x-bps-total")]
    pub x_bps_total: Option<u64>,
    /// Burst rate of `bps-total` (bytes per second).
    #[serde(rename = "x-bps-total-max")]
    pub x_bps_total_max: Option<u64>,
    /// Seconds the `bps-total-max` burst may last.
    #[serde(rename = "x-bps-total-max-length")]
    pub x_bps_total_max_length: Option<u64>,
    /// Average read limit (bytes per second).
    #[serde(rename = "x-bps-read")]
    pub x_bps_read: Option<u64>,
    /// Burst rate of `bps-read` (bytes per second).
    #[serde(rename = "x-bps-read-max")]
    pub x_bps_read_max: Option<u64>,
    /// Seconds the `bps-read-max` burst may last.
    #[serde(rename = "x-bps-read-max-length")]
    pub x_bps_read_max_length: Option<u64>,
    /// Average write limit (bytes per second).
    #[serde(rename = "x-bps-write")]
    pub x_bps_write: Option<u64>,
    /// Burst rate of `bps-write` (bytes per second).
    #[serde(rename = "x-bps-write-max")]
    pub x_bps_write_max: Option<u64>,
    /// Seconds the `bps-write-max` burst may last.
    #[serde(rename = "x-bps-write-max-length")]
    pub x_bps_write_max_length: Option<u64>,
    /// A request larger than this counts as several operations (bytes).
    #[serde(rename = "x-iops-size")]
    pub x_iops_size: Option<u64>,
}

impl ThrottleGroupProperties {
    /// The limits, `limits.*` and `x-*` merged (`x-*` wins, as in QEMU
    /// where both set the same property).
    pub fn merged(&self) -> ThrottleLimits {
        let mut l = self.limits.clone().unwrap_or_default();
        if self.x_iops_total.is_some() {
            l.iops_total = self.x_iops_total;
        }
        if self.x_iops_total_max.is_some() {
            l.iops_total_max = self.x_iops_total_max;
        }
        if self.x_iops_total_max_length.is_some() {
            l.iops_total_max_length = self.x_iops_total_max_length;
        }
        if self.x_iops_read.is_some() {
            l.iops_read = self.x_iops_read;
        }
        if self.x_iops_read_max.is_some() {
            l.iops_read_max = self.x_iops_read_max;
        }
        if self.x_iops_read_max_length.is_some() {
            l.iops_read_max_length = self.x_iops_read_max_length;
        }
        if self.x_iops_write.is_some() {
            l.iops_write = self.x_iops_write;
        }
        if self.x_iops_write_max.is_some() {
            l.iops_write_max = self.x_iops_write_max;
        }
        if self.x_iops_write_max_length.is_some() {
            l.iops_write_max_length = self.x_iops_write_max_length;
        }
        if self.x_bps_total.is_some() {
            l.bps_total = self.x_bps_total;
        }
        if self.x_bps_total_max.is_some() {
            l.bps_total_max = self.x_bps_total_max;
        }
        if self.x_bps_total_max_length.is_some() {
            l.bps_total_max_length = self.x_bps_total_max_length;
        }
        if self.x_bps_read.is_some() {
            l.bps_read = self.x_bps_read;
        }
        if self.x_bps_read_max.is_some() {
            l.bps_read_max = self.x_bps_read_max;
        }
        if self.x_bps_read_max_length.is_some() {
            l.bps_read_max_length = self.x_bps_read_max_length;
        }
        if self.x_bps_write.is_some() {
            l.bps_write = self.x_bps_write;
        }
        if self.x_bps_write_max.is_some() {
            l.bps_write_max = self.x_bps_write_max;
        }
        if self.x_bps_write_max_length.is_some() {
            l.bps_write_max_length = self.x_bps_write_max_length;
        }
        if self.x_iops_size.is_some() {
            l.iops_size = self.x_iops_size;
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use crate::object::{parse_object, ObjectProperties};

    #[test]
    fn limits_and_legacy_names_merge() {
        let o = parse_object(
            "throttle-group,id=g0,limits.iops-total=100,limits.iops-total-max=2000,\
             x-iops-total-max-length=60,x-bps-read=1048576",
        )
        .unwrap();
        let ObjectProperties::ThrottleGroup(p) = o.properties else {
            panic!("not a throttle group");
        };
        let l = p.merged();
        assert_eq!(l.iops_total, Some(100));
        assert_eq!(l.iops_total_max, Some(2000));
        assert_eq!(l.iops_total_max_length, Some(60));
        assert_eq!(l.bps_read, Some(1 << 20));
        assert_eq!(l.bps_write, None);
        let j = parse_object(
            r#"{"qom-type": "throttle-group", "id": "g0", "limits": {"iops-total": 100}}"#,
        )
        .unwrap();
        assert!(matches!(j.properties, ObjectProperties::ThrottleGroup(_)));
        let e = parse_object("throttle-group,id=g0,limits.iops-totl=1").unwrap_err();
        assert!(e.to_string().contains("iops-totl"), "{e}");
        let e = parse_object("throttle-group,id=g0,x-iops-total=many").unwrap_err();
        assert!(e.to_string().contains("x-iops-total"), "{e}");
    }
}
