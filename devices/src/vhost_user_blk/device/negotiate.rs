//! Talking to the backend: the handshake that does not depend on the
//! guest (features, protocol features, request channel, ownership, queue
//! count, configuration), and handing the guest's rings to the backend
//! and taking them back.

use super::*;

/// Connects to `path` and negotiates what does not depend on the guest:
/// features, protocol features, the request channel, ownership. Requests
/// time out after `HANDSHAKE_TIMEOUT` until the caller clears it.
pub(super) fn connect(path: &Path, max_queues: u64) -> Result<Conn, VhostUserBlkDeviceError> {
    let p = || path.display().to_string();
    let step = |step: &'static str| {
        move |source| VhostUserBlkDeviceError::Handshake {
            path: p(),
            step,
            source,
        }
    };
    let mut fe = Frontend::connect(path, max_queues)
        .map_err(|e| VhostUserBlkDeviceError::Connect(p(), e))?;
    // A backend that accepts but never answers (one serving another
    // frontend, as ours and qemu-storage-daemon's do) must not hang the
    // VMM's start or its reconnect loop.
    set_recv_timeout(&fe, Some(HANDSHAKE_TIMEOUT)).map_err(VhostUserBlkDeviceError::Host)?;
    let features = fe.get_features().map_err(step("GET_FEATURES"))?;
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(VhostUserBlkDeviceError::Backend(
            p(),
            "it has no protocol features (vhost-user-blk needs VHOST_USER_PROTOCOL_F_CONFIG)"
                .into(),
        ));
    }
    let theirs = fe
        .get_protocol_features()
        .map_err(step("GET_PROTOCOL_FEATURES"))?;
    if !theirs.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(VhostUserBlkDeviceError::Backend(
            p(),
            "VHOST_USER_PROTOCOL_F_CONFIG is required".into(),
        ));
    }
    let protocol = theirs & wanted_protocol();
    fe.set_protocol_features(protocol)
        .map_err(step("SET_PROTOCOL_FEATURES"))?;
    fe.set_owner().map_err(step("SET_OWNER"))?;
    let changed = Arc::new(ConfigChanged::default());
    let requests = if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        let mut h = FrontendReqHandler::new(changed.clone())
            .map_err(|e| step("BACKEND_REQ channel")(vhost::Error::VhostUserProtocol(e)))?;
        h.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
        fe.set_backend_request_fd(&h.get_tx_raw_fd())
            .map_err(step("SET_BACKEND_REQ_FD"))?;
        Some(h)
    } else {
        None
    };
    Ok(Conn {
        fe,
        features,
        protocol,
        requests,
        changed,
    })
}

/// How long a backend may take to answer a handshake request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sets (or clears) the receive timeout of the connection's socket.
pub(super) fn set_recv_timeout(fe: &Frontend, t: Option<Duration>) -> io::Result<()> {
    let t = t.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(t.subsec_micros() as i32),
    };
    // SAFETY: the fd is the frontend's open socket; `tv` is a valid timeval
    // of the size passed, read during the call only.
    let r = unsafe {
        libc::setsockopt(
            fe.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The backend's number of queues (1 without MQ).
pub(super) fn backend_queues(conn: &mut Conn) -> Result<u16, vhost::Error> {
    if !conn.protocol.contains(VhostUserProtocolFeatures::MQ) {
        return Ok(1);
    }
    let n = conn.fe.get_queue_num()?;
    Ok(u16::try_from(n).unwrap_or(u16::MAX))
}

/// The backend's configuration space.
pub(super) fn read_backend_config(conn: &mut Conn) -> Result<[u8; CONFIG_LEN], vhost::Error> {
    let (_, payload) = conn.fe.get_config(
        0,
        CONFIG_LEN as u32,
        VhostUserConfigFlags::WRITABLE,
        &[0u8; CONFIG_LEN],
    )?;
    let mut c = [0u8; CONFIG_LEN];
    let n = payload.len().min(CONFIG_LEN);
    c[..n].copy_from_slice(&payload[..n]);
    Ok(c)
}

/// Host address of `len` bytes of guest memory at `addr`, if they are
/// all in one region.
fn host_range(mem: &GuestMem, addr: u64, len: usize) -> Option<u64> {
    let slice = mem.get_slice(GuestAddress(addr), len).ok()?;
    Some(slice.ptr_guard().as_ptr() as u64)
}

/// Hands the guest's queues to the backend on `conn`: the memory table,
/// the inflight area, each ring's size, position, addresses, kick and
/// call, then enables them. `bases` is where each queue resumes.
pub(super) fn start_rings(
    shared: &Shared,
    conn: &mut Conn,
    inflight: &mut Option<Inflight>,
    active: &Active,
    kicks: &[EventFd],
    bases: &[u16],
) -> Result<(), String> {
    let err = |step: &'static str| move |e: vhost::Error| format!("{step}: {e}");
    let mut features = active.features;
    features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    conn.fe
        .set_features(features)
        .map_err(err("SET_FEATURES"))?;
    let regions = shared
        .mem
        .iter()
        .map(VhostUserMemoryRegionInfo::from_guest_region)
        .collect::<Result<Vec<_>, _>>()
        .map_err(err("memory table"))?;
    conn.fe
        .set_mem_table(&regions)
        .map_err(err("SET_MEM_TABLE"))?;
    if conn
        .protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    {
        if inflight.is_none() {
            let ask = VhostUserInflight::new(0, 0, shared.num_queues, shared.opts.queue_size);
            let (info, file) = conn
                .fe
                .get_inflight_fd(&ask)
                .map_err(err("GET_INFLIGHT_FD"))?;
            *inflight = Some(Inflight { info, file });
        }
        if let Some(i) = inflight.as_ref().filter(|i| i.info.mmap_size > 0) {
            conn.fe
                .set_inflight_fd(&i.info, i.file.as_raw_fd())
                .map_err(err("SET_INFLIGHT_FD"))?;
        }
    }
    for (n, ((i, q), call)) in active.queues.iter().zip(&active.calls).enumerate() {
        let i = *i;
        let desc = host_range(&shared.mem, q.desc, 16 * usize::from(q.size));
        let avail = host_range(&shared.mem, q.avail, 6 + 2 * usize::from(q.size));
        let used = host_range(&shared.mem, q.used, 6 + 8 * usize::from(q.size));
        let (Some(desc), Some(avail), Some(used)) = (desc, avail, used) else {
            return Err(format!("virtqueue {i} is not in guest RAM"));
        };
        conn.fe
            .set_vring_num(i, q.size)
            .map_err(err("SET_VRING_NUM"))?;
        conn.fe
            .set_vring_base(i, bases.get(n).copied().unwrap_or(0))
            .map_err(err("SET_VRING_BASE"))?;
        conn.fe
            .set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: q.max_size,
                    queue_size: q.size,
                    flags: 0,
                    desc_table_addr: desc,
                    used_ring_addr: used,
                    avail_ring_addr: avail,
                    log_addr: None,
                },
            )
            .map_err(err("SET_VRING_ADDR"))?;
        conn.fe
            .set_vring_kick(i, &kicks[i])
            .map_err(err("SET_VRING_KICK"))?;
        conn.fe
            .set_vring_call(i, call)
            .map_err(err("SET_VRING_CALL"))?;
    }
    for (i, _) in &active.queues {
        conn.fe
            .set_vring_enable(*i, true)
            .map_err(err("SET_VRING_ENABLE"))?;
    }
    Ok(())
}

/// Takes the queues back from the backend: disables each ring and asks
/// where it stopped (the backend completes what it has in flight first).
pub(super) fn stop_rings(conn: &mut Conn, active: &Active) -> Result<(), vhost::Error> {
    for (i, _) in &active.queues {
        conn.fe.set_vring_enable(*i, false)?;
    }
    for (i, _) in &active.queues {
        conn.fe.get_vring_base(*i)?;
    }
    Ok(())
}

/// Where each active queue resumes on a new backend: the guest's used
/// index, as QEMU's `virtio_queue_restore_last_avail_idx` does. With an
/// inflight area the backend resubmits what it had taken but not
/// finished; without one, requests the old backend took and did not
/// finish are not redone.
pub(super) fn resume_bases(mem: &GuestMem, active: &Active) -> Vec<u16> {
    active
        .queues
        .iter()
        .map(|(_, q)| {
            mem.read_obj::<u16>(GuestAddress(q.used).unchecked_add(2))
                .map(u16::from_le)
                .unwrap_or(0)
        })
        .collect()
}
