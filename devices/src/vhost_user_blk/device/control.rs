//! The device's control thread: it watches the connection and the
//! backend's request channel, rereads the configuration on a
//! CONFIG_CHANGE message and connects again after a loss.

use super::negotiate::*;
use super::*;

/// Rereads the backend's configuration after a CONFIG_CHANGE message and
/// raises the config interrupt.
fn config_changed(shared: &Shared, inner: &mut Inner) {
    let Some(conn) = inner.conn.as_mut() else {
        return;
    };
    match read_backend_config(conn) {
        Ok(mut c) => {
            c[NUM_QUEUES_OFFSET..NUM_QUEUES_OFFSET + 2]
                .copy_from_slice(&shared.num_queues.to_le_bytes());
            if let Some(v) = inner.writeback {
                c[WRITEBACK_OFFSET as usize] = v;
            }
            inner.config = c;
            if let Some(a) = &inner.active {
                let _ = a.interrupt.signal(VirtioIrq::Config);
            }
        }
        Err(e) => eprintln!("{}: GET_CONFIG failed: {e}", shared.label()),
    }
}

/// Connects again and puts the guest's queues back where they were.
fn reconnect(shared: &Shared, kicks: &[EventFd]) -> Result<(), String> {
    let mut conn = connect(&shared.opts.path, u64::from(MAX_QUEUES)).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(x) = src {
            s += &format!(": {x}");
            src = x.source();
        }
        s
    })?;
    let theirs = backend_queues(&mut conn).map_err(|e| format!("GET_QUEUE_NUM: {e}"))?;
    if theirs < shared.num_queues {
        return Err(format!(
            "the backend now has {theirs} queues, the device {}",
            shared.num_queues
        ));
    }
    let mut inner = shared.lock();
    let inner = &mut *inner;
    if let Some(a) = &inner.active {
        let missing =
            a.features & !conn.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if missing != 0 {
            return Err(format!(
                "the backend no longer offers features {missing:#x} the guest uses"
            ));
        }
    }
    if let Some(v) = inner.writeback {
        let _ = conn.fe.set_config(
            WRITEBACK_OFFSET as u32,
            VhostUserConfigFlags::WRITABLE,
            &[v],
        );
    }
    if let Some(a) = &inner.active {
        let bases = resume_bases(&shared.mem, a);
        start_rings(shared, &mut conn, &mut inner.inflight, a, kicks, &bases)?;
    }
    set_recv_timeout(&conn.fe, None).map_err(|e| e.to_string())?;
    // Counted before the connection shows, so whoever sees it connected
    // sees the count too.
    shared.reconnects.fetch_add(1, Ordering::SeqCst);
    shared.disconnected.store(false, Ordering::SeqCst);
    inner.conn = Some(conn);
    // The backend may have been resized while we were away.
    config_changed(shared, inner);
    Ok(())
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX));
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the
    // length passed.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(r as usize)
}

/// The device's control thread: watches the connection and the backend's
/// request channel, reconnects.
pub(super) fn control_thread(shared: &Shared, stop: &EventFd, kicks: &[EventFd]) {
    loop {
        let (sock, req): (Option<RawFd>, Option<RawFd>) = {
            let inner = shared.lock();
            match inner.conn.as_ref() {
                Some(c) => (
                    Some(c.fe.as_raw_fd()),
                    c.requests.as_ref().map(|r| r.as_raw_fd()),
                ),
                None => (None, None),
            }
        };
        let mut fds = vec![libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = sock {
            // Only a hang-up: replies are read by whoever sent the request.
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            });
        }
        if let Some(fd) = req {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Without a connection: try again after `reconnect` (or wait for
        // the end only).
        let timeout = if sock.is_none() {
            shared.opts.reconnect
        } else {
            None
        };
        if let Err(e) = poll_fds(&mut fds, timeout) {
            eprintln!("{}: poll failed: {e}", shared.label());
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if sock.is_none() {
            if shared.opts.reconnect.is_some() {
                match reconnect(shared, kicks) {
                    Ok(()) => {
                        eprintln!("{}: reconnected to the backend", shared.label());
                        shared.event(BackendEvent::Reconnected);
                    }
                    Err(e) => {
                        if !shared.disconnected.swap(true, Ordering::SeqCst) {
                            eprintln!("{}: reconnect failed: {e}", shared.label());
                        }
                    }
                }
            }
            continue;
        }
        let hup = fds[1].revents != 0;
        let mut guard = shared.lock();
        let inner = &mut *guard;
        if !hup && fds.len() > 2 && fds[2].revents != 0 {
            let mut changed = false;
            let mut lost = false;
            if let Some(conn) = inner.conn.as_mut() {
                if let Some(r) = conn.requests.as_mut() {
                    match r.handle_request() {
                        Ok(_) => changed = conn.changed.0.swap(false, Ordering::SeqCst),
                        Err(_) => lost = true,
                    }
                }
            }
            if lost {
                // The request channel died: the backend is going away;
                // the main socket's hang-up follows.
                if let Some(c) = inner.conn.as_mut() {
                    c.requests = None;
                }
            }
            if changed {
                config_changed(shared, inner);
            }
            continue;
        }
        if hup {
            inner.conn = None;
            // The hook may ask the device things: not under the lock.
            drop(guard);
            shared.disconnected.store(true, Ordering::SeqCst);
            shared.event(BackendEvent::Disconnected {
                reconnecting: shared.opts.reconnect.is_some(),
            });
            match shared.opts.reconnect {
                Some(d) => eprintln!(
                    "{}: backend disconnected; reconnecting every {} ms",
                    shared.label(),
                    d.as_millis()
                ),
                None => eprintln!(
                    "{}: backend disconnected; the disk has no backend now (set reconnect-ms \
                     on the chardev to reconnect)",
                    shared.label()
                ),
            }
        }
    }
}
