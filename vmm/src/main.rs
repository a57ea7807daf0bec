//! `blkvm`: the command line. Each subcommand lives in its own module; this
//! file parses arguments and prints errors with their whole cause chain.

mod bench;
mod run;
mod run_qmp;
mod signals;
mod startup;
mod storage_daemon;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
// The QMP server lives in the library; `crate::qmp` keeps naming it here.
use vmm::qmp;

/// blkvm: a KVM microVM monitor built around a QEMU-style block layer.
#[derive(Parser)]
#[command(name = "blkvm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure a block node: IOPS, bandwidth and latency percentiles.
    Bench(bench::BenchArgs),
    /// Boot a guest in a KVM microVM with virtio-blk disks.
    Run(run::RunArgs),
    /// Serve block nodes to other processes (vhost-user-blk), like
    /// qemu-storage-daemon.
    StorageDaemon(storage_daemon::StorageDaemonArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Run(args) => run::run(args),
        Command::StorageDaemon(args) => storage_daemon::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkvm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
