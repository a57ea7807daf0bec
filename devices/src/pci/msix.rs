//! MSI-X (PCI Local Bus 3.0, 6.8.2): the vector table and pending-bit
//! array a device exposes in a BAR, and delivery through KVM.
//!
//! Each vector has a GSI of its own, an irqfd on it and an MSI route that
//! follows the table entry: while the vector is masked (its own mask bit,
//! the function mask, or MSI-X disabled) the route is removed and a
//! signal only sets the pending bit; unmasking restores the route and
//! delivers what was pending. The signalling side runs on IOThreads and
//! uses only atomics: it sets `pending` before it looks at `masked`, and
//! the unmasking side clears `masked` before it takes `pending`, so a
//! signal racing an unmask is delivered exactly once.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{MsiMessage, VmHooks};

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Capability id.
pub const CAP_ID: u8 = 0x11;
/// Message control: MSI-X enable.
pub const CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: mask bit.
const VECTOR_MASKED: u32 = 1;

struct Vector {
    masked: AtomicBool,
    pending: AtomicBool,
    /// Another process holds the irqfd (a vhost-user backend's call fd)
    /// and may have written it while the route was gone: unmasking
    /// delivers once unconditionally.
    direct: AtomicBool,
    irqfd: EventFd,
    gsi: u32,
}

/// The part IOThreads use to signal vectors.
pub struct MsixSignal {
    vectors: Vec<Vector>,
}

impl MsixSignal {
    /// Signals vector `v` (ignored if out of range).
    pub fn trigger(&self, v: u16) -> io::Result<()> {
        let Some(vec) = self.vectors.get(usize::from(v)) else {
            return Ok(());
        };
        vec.pending.store(true, Ordering::SeqCst);
        if vec.masked.load(Ordering::SeqCst) {
            return Ok(());
        }
        if vec.pending.swap(false, Ordering::SeqCst) {
            vec.irqfd.write(1)?;
        }
        Ok(())
    }

    /// A duplicate of vector `v`'s irqfd for another process to write
    /// (`None` when out of range). Such writes bypass the mask; while the
    /// vector is masked its route is gone and KVM drops them, so from now
    /// on every unmask of `v` delivers one interrupt (a spurious one at
    /// worst, which virtio drivers tolerate), as QEMU's masked notifier
    /// ends in a check of the ring.
    pub fn direct_notifier(&self, v: u16) -> io::Result<Option<EventFd>> {
        let Some(vec) = self.vectors.get(usize::from(v)) else {
            return Ok(None);
        };
        vec.direct.store(true, Ordering::SeqCst);
        vec.irqfd.try_clone().map(Some)
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }
}

#[derive(Clone, Copy)]
struct Entry {
    addr: u64,
    data: u32,
    ctrl: u32,
}

/// A device's MSI-X state.
pub struct Msix {
    signal: Arc<MsixSignal>,
    table: Vec<Entry>,
    routes: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
    hooks: Arc<dyn VmHooks>,
}

impl Msix {
    /// `n` vectors (1..=2048), each with a GSI and a registered irqfd; all
    /// masked, MSI-X disabled.
    pub fn new(n: u16, hooks: Arc<dyn VmHooks>) -> io::Result<Self> {
        if n == 0 || n > 2048 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "MSI-X table size must be 1..=2048",
            ));
        }
        let mut vectors = Vec::with_capacity(usize::from(n));
        let mut fail = None;
        for _ in 0..n {
            let r = hooks.allocate_gsi().and_then(|gsi| {
                let irqfd = EventFd::new(EFD_NONBLOCK)?;
                hooks.register_irqfd(&irqfd, gsi)?;
                Ok(Vector {
                    masked: AtomicBool::new(true),
                    pending: AtomicBool::new(false),
                    direct: AtomicBool::new(false),
                    irqfd,
                    gsi,
                })
            });
            match r {
                Ok(v) => vectors.push(v),
                Err(e) => {
                    fail = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = fail {
            for v in &vectors {
                let _ = hooks.unregister_irqfd(&v.irqfd, v.gsi);
            }
            return Err(e);
        }
        let entry = Entry {
            addr: 0,
            data: 0,
            ctrl: VECTOR_MASKED,
        };
        Ok(Msix {
            signal: Arc::new(MsixSignal { vectors }),
            table: vec![entry; usize::from(n)],
            routes: vec![None; usize::from(n)],
            enabled: false,
            function_masked: false,
            hooks,
        })
    }

    /// The signalling side, for IOThreads.
    pub fn signal(&self) -> Arc<MsixSignal> {
        self.signal.clone()
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.table.len() as u16
    }

    /// Whether there are no vectors (never: `new` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// GSI of vector `v`.
    pub fn gsi(&self, v: u16) -> Option<u32> {
        self.signal.vectors.get(usize::from(v)).map(|x| x.gsi)
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The capability body (12 bytes) with the table and PBA at these
    /// offsets of BAR `bir`.
    pub fn capability(&self, bir: u8, table: u32, pba: u32) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[0] = CAP_ID;
        c[2..4].copy_from_slice(&(self.len() - 1).to_le_bytes());
        c[4..8].copy_from_slice(&(table | u32::from(bir)).to_le_bytes());
        c[8..12].copy_from_slice(&(pba | u32::from(bir)).to_le_bytes());
        c
    }

    /// The guest wrote the message control register.
    pub fn set_control(&mut self, ctrl: u16) {
        let enabled = ctrl & CTRL_ENABLE != 0;
        let fmask = ctrl & CTRL_FUNCTION_MASK != 0;
        if (enabled, fmask) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = fmask;
        for v in 0..self.table.len() {
            self.update(v);
        }
    }

    /// The message control bits the guest can change, as they stand.
    pub fn control(&self) -> u16 {
        (if self.enabled { CTRL_ENABLE } else { 0 })
            | (if self.function_masked {
                CTRL_FUNCTION_MASK
            } else {
                0
            })
            | (self.len() - 1)
    }

    /// Makes the route and the mask of vector `v` follow the table.
    fn update(&mut self, v: usize) {
        let e = self.table[v];
        let masked = !self.enabled || self.function_masked || e.ctrl & VECTOR_MASKED != 0;
        let vec = &self.signal.vectors[v];
        let want = (!masked).then_some(MsiMessage {
            address: e.addr,
            data: e.data,
        });
        if masked {
            vec.masked.store(true, Ordering::SeqCst);
        }
        if want != self.routes[v] {
            if let Err(e) = self.hooks.set_msi_route(vec.gsi, want) {
                eprintln!("msix: could not route vector {v}: {e}");
            }
            self.routes[v] = want;
        }
        if !masked {
            let was_masked = vec.masked.swap(false, Ordering::SeqCst);
            if vec.pending.swap(false, Ordering::SeqCst)
                || (was_masked && vec.direct.load(Ordering::SeqCst))
            {
                let _ = vec.irqfd.write(1);
            }
        }
    }

    /// A read of the table at `offset`: 4 or 8 bytes, aligned; else zeros.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (i, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = self.table.get(i) else {
            return;
        };
        let dwords = [e.addr as u32, (e.addr >> 32) as u32, e.data, e.ctrl];
        match (data.len(), field) {
            (4, f) if f % 4 == 0 => {
                data.copy_from_slice(&dwords[f as usize / 4].to_le_bytes());
            }
            (8, f) if f % 8 == 0 => {
                let k = f as usize / 4;
                data[..4].copy_from_slice(&dwords[k].to_le_bytes());
                data[4..].copy_from_slice(&dwords[k + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    /// A write to the table at `offset`: 4 or 8 bytes, aligned; else ignored.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let (i, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        if i >= self.table.len() {
            return;
        }
        let set = |e: &mut Entry, dword: u64, v: u32| match dword {
            0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(v),
            1 => e.addr = (e.addr & 0xffff_ffff) | (u64::from(v) << 32),
            2 => e.data = v,
            // Only the mask bit of vector control is writable.
            _ => e.ctrl = v & VECTOR_MASKED,
        };
        let e = &mut self.table[i];
        match (data.len(), field) {
            (4, f) if f % 4 == 0 => {
                set(
                    e,
                    f / 4,
                    u32::from_le_bytes(data.try_into().unwrap_or_default()),
                );
            }
            (8, f) if f % 8 == 0 => {
                set(
                    e,
                    f / 4,
                    u32::from_le_bytes(data[..4].try_into().unwrap_or_default()),
                );
                set(
                    e,
                    f / 4 + 1,
                    u32::from_le_bytes(data[4..].try_into().unwrap_or_default()),
                );
            }
            _ => return,
        }
        self.update(i);
    }

    /// A read of the pending-bit array at `offset` (4 or 8 bytes).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (byte, b) in data.iter_mut().enumerate() {
            for bit in 0..8 {
                let v = (offset as usize + byte) * 8 + bit;
                if let Some(vec) = self.signal.vectors.get(v) {
                    if vec.pending.load(Ordering::SeqCst) {
                        *b |= 1 << bit;
                    }
                }
            }
        }
    }
}

impl Drop for Msix {
    fn drop(&mut self) {
        for (v, r) in self.signal.vectors.iter().zip(&self.routes) {
            if r.is_some() {
                let _ = self.hooks.set_msi_route(v.gsi, None);
            }
            let _ = self.hooks.unregister_irqfd(&v.irqfd, v.gsi);
        }
    }
}
