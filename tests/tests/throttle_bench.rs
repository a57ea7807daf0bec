//! `blkvm bench` through a `throttle` node: over 10 s the configured IOPS
//! and bandwidth hold within 5% (the filter's own tests cover bursts,
//! fairness and live changes in process).

use std::process::Command;

use anyhow::{ensure, Context, Result};

fn bench(object: &str, rw: &str, bs: &str) -> Result<serde_json::Value> {
    let out = Command::new(tests::blkvm_binary()?)
        .args(["bench", "--object", object, "--blockdev"])
        .arg("throttle,node-name=t0,throttle-group=g0,file.driver=null-co,file.size=1G")
        .args([
            "--rw",
            rw,
            "--bs",
            bs,
            "--iodepth",
            "16",
            "--runtime",
            "10",
            "--json",
        ])
        .output()
        .context("blkvm bench")?;
    ensure!(
        out.status.success(),
        "blkvm bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn bench_through_a_throttle_node_holds_iops_and_bandwidth() -> Result<()> {
    let v = bench("throttle-group,id=g0,x-iops-total=3000", "randread", "4k")?;
    let iops = v["iops"].as_f64().context("iops")?;
    ensure!(
        (iops - 3000.0).abs() <= 150.0,
        "{iops:.0} IOPS through iops-total=3000"
    );
    let v = bench(
        "throttle-group,id=g0,limits.bps-write=33554432",
        "randwrite",
        "64k",
    )?;
    let mib = v["mib_s"].as_f64().context("mib_s")?;
    ensure!(
        (mib - 32.0).abs() <= 1.6,
        "{mib:.1} MiB/s through bps-write=32M"
    );
    Ok(())
}
