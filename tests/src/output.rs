//! [`GuestOutput`]: what a test guest printed on its console, and the
//! `BLKVM-RESULT key=value` / `BLKVM-DONE rc=N` lines parsed out of it.
//! Errors made from it carry the whole console, since a failed guest test
//! is debugged from its boot log.

use std::{collections::BTreeMap, fmt::Write as _, process::ExitStatus};

use anyhow::{anyhow, Result};

/// Console lines shown in full at the end of an error.
const TAIL_LINES: usize = 80;

/// The console for an error message. A long console is cut to the lines
/// that say what went wrong (QEMU's own messages, assertions, panics,
/// `BLKVM-` lines) and its last [`TAIL_LINES`] lines, since CI shows only
/// the head and tail of a long log; the whole console goes to a file
/// whose path is printed.
pub(crate) fn console_block(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    if lines.len() <= TAIL_LINES * 2 {
        return format!("--- guest console ---\n{console}--- end of guest console ---");
    }
    let tail_start = lines.len() - TAIL_LINES;
    let mut out = String::new();
    if let Some(path) = save_console(console) {
        let _ = writeln!(out, "(the whole console: {})", path.display());
    }
    out.push_str("--- notable console lines ---\n");
    for line in &lines[..tail_start] {
        if notable(line) {
            out.push_str(line);
            out.push('\n');
        }
    }
    let _ = writeln!(
        out,
        "--- the last {TAIL_LINES} of {} console lines ---",
        lines.len()
    );
    for line in &lines[tail_start..] {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("--- end of guest console ---");
    out
}

/// Whether a console line is worth showing out of a long boot log.
fn notable(line: &str) -> bool {
    const MARKS: [&str; 10] = [
        "qemu-system",
        "qemu:",
        "Assertion",
        "assert",
        "panic",
        "BUG",
        "Call Trace",
        "error",
        "BLKVM-",
        "blkvm",
    ];
    MARKS.iter().any(|m| line.contains(m))
}

/// Writes the console to a file under the temporary directory, for a
/// failed test to be debugged from; `None` if that fails.
fn save_console(console: &str) -> Option<std::path::PathBuf> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "blkvm-guest-console-{}-{seq}.log",
        std::process::id()
    ));
    std::fs::write(&path, console).ok().map(|()| path)
}

/// What a guest printed.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// `BLKVM-RESULT key=value` lines (the value runs to the end of the
    /// line; a key printed twice keeps its last value).
    pub results: BTreeMap<String, String>,
    /// N of `BLKVM-DONE rc=N`: the script's exit code, `None` if the guest
    /// never got there.
    pub rc: Option<i32>,
    /// The whole serial console, with QEMU's stderr mixed in.
    pub console: String,
    /// QEMU's exit status.
    pub status: Option<ExitStatus>,
}

impl GuestOutput {
    pub(crate) fn parse(console: String, status: Option<ExitStatus>) -> Self {
        let mut results = BTreeMap::new();
        let mut rc = None;
        for line in console.lines() {
            if let Some((_, rest)) = line.split_once("BLKVM-RESULT ") {
                if let Some((key, value)) = rest.split_once('=') {
                    results.insert(key.trim().to_owned(), value.to_owned());
                }
            } else if let Some((_, rest)) = line.split_once("BLKVM-DONE rc=") {
                rc = rest.trim().parse().ok();
            }
        }
        GuestOutput {
            results,
            rc,
            console,
            status,
        }
    }

    /// The value of result `key`; an error (with the console) if the guest
    /// did not report it.
    pub fn result(&self, key: &str) -> Result<&str> {
        self.results
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| self.error(&format!("the guest reported no {key:?}")))
    }

    /// Fails unless the script ended with exit code 0.
    pub fn check_success(&self) -> Result<()> {
        match self.rc {
            Some(0) => Ok(()),
            Some(rc) => Err(self.error(&format!("the guest's script failed: rc={rc}"))),
            None => Err(self.error(&format!(
                "the guest never finished its script (QEMU: {})",
                self.status
                    .map_or_else(|| "no status".to_owned(), |s| s.to_string())
            ))),
        }
    }

    /// An error that says `what` and shows the console, for assertions
    /// the caller makes on the results.
    pub fn error(&self, what: &str) -> anyhow::Error {
        let mut results = String::new();
        for (key, value) in &self.results {
            let _ = writeln!(results, "  {key}={value}");
        }
        anyhow!(
            "{what}\nresults:\n{results}{}",
            console_block(&self.console)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_collects_results_and_the_exit_code_from_noisy_lines() {
        let console = "[    1.0] Run /init\n\
                       BLKVM-RESULT vda.size=131072\n\
                       [ 2.0] virtio: noise BLKVM-RESULT msg=two words = here\r\n\
                       BLKVM-RESULT vda.size=42\n\
                       BLKVM-DONE rc=3\n";

        let out = GuestOutput::parse(console.to_owned(), None);

        assert_eq!(out.result("vda.size").unwrap(), "42");
        assert_eq!(out.result("msg").unwrap(), "two words = here");
        assert_eq!(out.rc, Some(3));
        assert!(out.check_success().is_err());
    }

    #[test]
    fn a_missing_result_is_an_error_that_shows_the_console() {
        let out = GuestOutput::parse("booted\nBLKVM-DONE rc=0\n".to_owned(), None);

        let err = out.result("vda.ro").unwrap_err().to_string();

        assert!(err.contains("\"vda.ro\""));
        assert!(err.contains("booted"));
        assert!(out.check_success().is_ok());
    }

    #[test]
    fn a_long_console_keeps_qemus_messages_and_its_tail() {
        let mut console = String::new();
        for i in 0..1000 {
            console.push_str(&format!("[ {i}.0] boot noise {i}\n"));
            if i == 10 {
                console.push_str("qemu-system-x86_64: hw/foo.c:1: bar: Assertion `x' failed.\n");
            }
        }

        let block = console_block(&console);

        assert!(block.contains("Assertion `x' failed"));
        assert!(block.contains("boot noise 999"));
        assert!(block.contains(&format!("boot noise {}", 1000 - TAIL_LINES)));
        assert!(!block.contains("boot noise 500\n"));
        let path = block
            .lines()
            .find_map(|l| l.strip_prefix("(the whole console: "))
            .and_then(|l| l.strip_suffix(')'))
            .expect("the saved console's path");
        assert_eq!(std::fs::read_to_string(path).unwrap(), console);
        std::fs::remove_file(path).unwrap();
    }
}
