//! A bare QMP client for tests: one command line at a time, replies
//! matched in order, events kept aside.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// A bare QMP client: commands in, replies and events out.
pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Events seen while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (waiting up to 20 s for the socket) and negotiates.
    pub fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e).context("QMP socket"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
            events: Vec::new(),
        };
        q.line()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value> {
        let mut l = String::new();
        ensure!(self.r.read_line(&mut l)? > 0, "QMP closed");
        Ok(serde_json::from_str(&l)?)
    }

    /// Runs `cmd`; its `return`, or its error as an `Err`.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let reply = self.raw(&json!({"execute": cmd, "arguments": args}).to_string())?;
        if let Some(e) = reply.get("error") {
            bail!("{cmd}: {e}");
        }
        Ok(reply["return"].clone())
    }

    /// Sends one line as it is and returns the reply (events kept).
    pub fn raw(&mut self, line: &str) -> Result<Value> {
        writeln!(self.w, "{line}")?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            return Ok(v);
        }
    }

    /// Waits for an event named `name`.
    pub fn event(&mut self, name: &str) -> Result<Value> {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i));
            }
            let v = self.line().with_context(|| format!("waiting for {name}"))?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}
