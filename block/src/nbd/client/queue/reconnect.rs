//! A lost connection: requests fail with EIO or, with `reconnect-delay`,
//! wait (a timer ends the wait); a background thread reconnects with a
//! growing pause and hands the new connection over through the queue's
//! eventfd.

use super::*;

/// A connection being re-established by a background thread.
pub(super) struct Reconnect {
    pub(super) socket: Mutex<Option<Transport>>,
    pub(super) ready: AtomicBool,
    pub(super) cancel: AtomicBool,
}

impl NbdQueue {
    /// The connection is gone: requests fail, or wait for the next one.
    pub(super) fn lose(&mut self, why: &str) {
        let delay = self.shared.reconnect_delay;
        let since = Instant::now();
        if let Link::Up(t) = &mut self.link {
            let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, t.fd(), 0, 0);
            t.shutdown();
            eprintln!(
                "nbd: node '{}': connection to {} lost ({why}); reconnecting",
                self.shared.common.name, self.shared.target.what
            );
        }
        let reconnect = Arc::new(Reconnect {
            socket: Mutex::new(None),
            ready: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
        });
        self.link = Link::Down {
            since,
            reconnect: reconnect.clone(),
        };
        self.watching_out = false;
        self.rx = Rx::Header;
        self.in_start = 0;
        self.in_end = 0;
        self.out_bytes.clear();
        self.own_pos = 0;
        self.segs.clear();
        self.first_off = 0;
        for i in 0..self.slots.len() as u32 {
            if self.slots[i as usize].is_none() || self.waiting.contains(&i) {
                continue;
            }
            if delay.is_zero() {
                let s = self.release(i);
                self.local.push(Completion {
                    request: s.req,
                    result: Err(RequestError::Os(libc::EIO)),
                });
            } else {
                let s = self.slot_mut(i);
                s.error = 0;
                if s.then_flush && s.cmd == cmd::FLUSH && s.req.op() == RequestOp::Write {
                    // The write may not have been durable: do both again.
                    s.cmd = cmd::WRITE;
                    s.flags = 0;
                }
                self.waiting.push(i);
            }
        }
        if !delay.is_zero() {
            let due = since + delay;
            self.timer_due = Some(due);
            let _ = self.timer.reset(
                due.saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1)),
                None,
            );
        }
        let shared = self.shared.clone();
        let eventfd = self.eventfd.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-reconnect".into())
            .spawn(move || {
                sandbox::enter(sandbox::ThreadKind::NbdReconnect);
                reconnect_loop(&shared, &reconnect, &eventfd)
            });
        if let Err(e) = spawned {
            eprintln!("nbd: cannot start a reconnect thread: {e}");
        }
    }

    /// Fails the requests that waited for the connection too long.
    pub(super) fn expire(&mut self) {
        self.timer_due = None;
        let _ = self.timer.reset(Duration::ZERO, None);
        for i in std::mem::take(&mut self.waiting) {
            let s = self.release(i);
            self.local.push(Completion {
                request: s.req,
                result: Err(RequestError::Os(libc::EIO)),
            });
        }
    }

    /// Takes a connection the reconnect thread made.
    pub(super) fn reconnected(&mut self) {
        let Link::Down { reconnect, .. } = &self.link else {
            return;
        };
        if !reconnect.ready.load(Ordering::Acquire) {
            return;
        }
        let Some(sock) = lock(&reconnect.socket).take() else {
            return;
        };
        if let Err(e) = epoll_ctl(
            &self.epoll,
            libc::EPOLL_CTL_ADD,
            sock.fd(),
            libc::EPOLLIN as u32,
            TOKEN_SOCKET,
        ) {
            eprintln!("nbd: cannot watch the new connection: {e}");
            return;
        }
        eprintln!(
            "nbd: node '{}': reconnected to {}",
            self.shared.common.name, self.shared.target.what
        );
        self.link = Link::Up(sock);
        if self.timer_due.take().is_some() {
            let _ = self.timer.reset(Duration::ZERO, None);
        }
        for i in std::mem::take(&mut self.waiting) {
            self.send(i);
        }
    }
}

/// Reconnects in the background, with a growing pause between tries.
pub(super) fn reconnect_loop(shared: &Shared, r: &Reconnect, eventfd: &EventFd) {
    let mut pause = Duration::from_millis(50);
    let mut reported = false;
    while !r.cancel.load(Ordering::Acquire) {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
        if r.cancel.load(Ordering::Acquire) {
            break;
        }
        let made = shared
            .target
            .connect()
            .and_then(|(s, info)| shared.check_same(&info).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s));
        match made {
            Ok(s) => {
                *lock(&r.socket) = Some(s);
                r.ready.store(true, Ordering::Release);
                let _ = eventfd.write(1);
                return;
            }
            Err(e) if !reported => {
                eprintln!("nbd: reconnecting to {}: {e}", shared.target.what);
                reported = true;
            }
            Err(_) => {}
        }
    }
}
