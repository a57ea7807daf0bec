//! The node's side of a libblkio instance: the `Blkio` handle (behind a
//! mutex, taken only to map or unmap memory and to re-read the capacity),
//! the mapped memory regions with a count of the queues using each, and
//! the libblkio queues no data-plane thread has taken yet.
//!
//! Mappings are counted because libblkio maps memory per device, not per
//! queue: two queues that both see a registered region share one mapping,
//! which goes away when the last of them lets go of it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use blkio::{Blkio, Blkioq, Errno};

use crate::memory::MemoryRegion;

/// Identifies a mapping: start address and length.
pub(super) type MapKey = (u64, u64);

struct Mapping {
    key: MapKey,
    region: blkio::MemoryRegion,
    users: u32,
    /// Keeps the fd libblkio was given open while the region is mapped.
    _fd: Option<Arc<OwnedFd>>,
}

struct Device {
    blkio: Blkio,
    maps: Vec<Mapping>,
}

/// What the node and its queues share of one libblkio instance.
pub(super) struct Control {
    // Declared first so the queues are dropped before the device.
    free: Mutex<Vec<Blkioq>>,
    device: Mutex<Device>,
    num_queues: usize,
    needs_fd: bool,
    align: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// libblkio's error as an `io::Error` that keeps its message.
pub(super) fn io_error(e: &blkio::Error, what: &str) -> io::Error {
    let kind = io::Error::from_raw_os_error(e.errno().raw_os_error()).kind();
    io::Error::new(kind, format!("{what}: {}", e.message()))
}

impl Control {
    pub fn new(blkio: Blkio, queues: Vec<Blkioq>, needs_fd: bool, align: u64) -> Self {
        Control {
            num_queues: queues.len(),
            free: Mutex::new(queues),
            device: Mutex::new(Device {
                blkio,
                maps: Vec::new(),
            }),
            needs_fd,
            align,
        }
    }

    /// How many libblkio queues the node has.
    pub fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// A queue for a data-plane thread, if one is free.
    pub fn take_queue(&self) -> Option<Blkioq> {
        lock(&self.free).pop()
    }

    /// Hands a queue back (its requests all completed).
    pub fn give_back(&self, q: Blkioq) {
        lock(&self.free).push(q);
    }

    /// The device's size, read again.
    pub fn capacity(&self) -> Result<u64, blkio::Error> {
        lock(&self.device).blkio.get_u64("capacity")
    }

    /// Maps `r` for the device, or counts one more user of its mapping.
    pub fn map(&self, r: &MemoryRegion) -> Result<MapKey, blkio::Error> {
        let key = (r.host_addr, r.len);
        if !r.host_addr.is_multiple_of(self.align) || !r.len.is_multiple_of(self.align) {
            return Err(blkio::Error::new(
                Errno::INVAL,
                format!("region breaks mem-region-alignment {}", self.align),
            ));
        }
        let mut dev = lock(&self.device);
        if let Some(m) = dev.maps.iter_mut().find(|m| m.key == key) {
            m.users += 1;
            return Ok(key);
        }
        let fd = match &r.fd {
            Some(fd) => fd.as_raw_fd(),
            None if self.needs_fd => {
                return Err(blkio::Error::new(
                    Errno::INVAL,
                    "the driver needs memory regions backed by a file descriptor",
                ))
            }
            None => -1,
        };
        let bad = |what: &'static str| blkio::Error::new(Errno::OVERFLOW, what);
        let region = blkio::MemoryRegion {
            addr: usize::try_from(r.host_addr).map_err(|_| bad("address out of range"))?,
            iova: 0,
            len: usize::try_from(r.len).map_err(|_| bad("length out of range"))?,
            fd,
            fd_offset: i64::try_from(r.fd_offset).map_err(|_| bad("fd offset out of range"))?,
            flags: 0,
        };
        dev.blkio.map_mem_region(&region)?;
        dev.maps.push(Mapping {
            key,
            region,
            users: 1,
            _fd: r.fd.clone(),
        });
        Ok(key)
    }

    /// Drops one user of a mapping; the last one unmaps it.
    pub fn unmap(&self, key: MapKey) {
        let mut dev = lock(&self.device);
        let Some(i) = dev.maps.iter().position(|m| m.key == key) else {
            return;
        };
        dev.maps[i].users -= 1;
        if dev.maps[i].users == 0 {
            let m = dev.maps.swap_remove(i);
            dev.blkio.unmap_mem_region(&m.region);
        }
    }
}
