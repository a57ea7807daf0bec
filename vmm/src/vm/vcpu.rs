//! vCPUs: configuration before the first run, and one thread per vCPU
//! that runs it and dispatches its exits.
//!
//! Port and MMIO exits go to the [`Bus`]es (an access nobody claims reads
//! all ones and drops writes, as on a PC). A triple fault, an internal KVM
//! error or a failed entry ends the VM with a message that names the exit
//! and the vCPU. To stop, the VMM sets the stop flag and kicks each thread
//! with a signal, which makes `KVM_RUN` return `EINTR`. To pause (QMP
//! `stop`), it requests a pause from [`VcpuPause`] and kicks the same way;
//! each thread parks between two runs until `cont` or the VM stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::{
    CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::layout::{PVH_INFO_START, ZERO_PAGE_START};
use super::legacy::VmExitReason;
use super::x86_64::boot::EntryPoint;
use super::x86_64::{cpuid, regs};

/// Why a vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {0}: {1} failed")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
    /// KVM took fewer MSRs than given.
    #[error("vCPU {0}: KVM set {1} of {2} boot MSRs")]
    Msrs(u8, usize, usize),
    /// The boot state could not be written.
    #[error("vCPU {0}")]
    BootState(u8, #[source] regs::BootStateError),
    /// The CPUID table is too large.
    #[error("vCPU {0}: CPUID table too large")]
    Cpuid(u8),
    /// The thread could not be started.
    #[error("vCPU {0}: could not start its thread")]
    Thread(u8, #[source] std::io::Error),
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) kick handler; call once before starting vCPUs.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop)
}

/// Sets CPUID, MSRs, FPU and LAPIC LINT pins of vCPU `id`; the boot vCPU
/// (id 0) also gets registers for `entry`. Application processors wait
/// for INIT/SIPI in the in-kernel LAPIC.
pub fn configure<M: GuestMemoryBackend>(
    vcpu: &VcpuFd,
    id: u8,
    num_cpus: u8,
    supported_cpuid: &CpuId,
    mem: &M,
    entry: EntryPoint,
) -> Result<(), VcpuError> {
    let kvm = |what, r: Result<(), kvm_ioctls::Error>| r.map_err(|e| VcpuError::Kvm(id, what, e));
    let entries = cpuid::fixup(supported_cpuid.as_slice(), id, num_cpus);
    let table = CpuId::from_entries(&entries).map_err(|_| VcpuError::Cpuid(id))?;
    kvm("KVM_SET_CPUID2", vcpu.set_cpuid2(&table))?;

    let msrs = regs::boot_msrs();
    let table = Msrs::from_entries(&msrs).map_err(|_| VcpuError::Cpuid(id))?;
    let set = vcpu
        .set_msrs(&table)
        .map_err(|e| VcpuError::Kvm(id, "KVM_SET_MSRS", e))?;
    if set != msrs.len() {
        return Err(VcpuError::Msrs(id, set, msrs.len()));
    }
    kvm("KVM_SET_FPU", vcpu.set_fpu(&regs::boot_fpu()))?;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| VcpuError::Kvm(id, "KVM_GET_LAPIC", e))?;
    regs::set_lint(&mut lapic);
    kvm("KVM_SET_LAPIC", vcpu.set_lapic(&lapic))?;
    if id != 0 {
        return Ok(());
    }
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| VcpuError::Kvm(id, "KVM_GET_SREGS", e))?;
    let r = match entry {
        EntryPoint::Linux64(rip) => {
            regs::setup_long_mode(mem, &mut sregs).map_err(|e| VcpuError::BootState(id, e))?;
            regs::long_mode_regs(rip, ZERO_PAGE_START)
        }
        EntryPoint::Pvh(rip) => {
            regs::setup_pvh_mode(mem, &mut sregs).map_err(|e| VcpuError::BootState(id, e))?;
            regs::pvh_regs(rip, PVH_INFO_START)
        }
    };
    kvm("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
    kvm("KVM_SET_REGS", vcpu.set_regs(&r))
}

/// What a vCPU thread shares with the rest of the VM.
#[derive(Clone)]
pub struct VcpuContext {
    /// The port I/O bus.
    pub pio: Arc<RwLock<Bus>>,
    /// The MMIO bus.
    pub mmio: Arc<RwLock<Bus>>,
    /// Where exits that end the VM are reported.
    pub exits: Sender<VmExitReason>,
    /// Set when the VM stops; the thread leaves at its next exit.
    pub stop: Arc<AtomicBool>,
    /// Pausing and resuming (QMP `stop` and `cont`).
    pub pause: Arc<VcpuPause>,
}

/// The pause state the vCPU threads share with whoever pauses them.
#[derive(Default)]
pub struct VcpuPause {
    /// Checked by each thread before every `KVM_RUN`, without the lock.
    requested: AtomicBool,
    state: Mutex<PauseState>,
    changed: Condvar,
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    /// Bumped by each pause request, so a thread still parked from the
    /// last pause counts itself again.
    generation: u64,
    /// Threads parked since the current pause was requested.
    parked: usize,
    /// Threads that ended (they count as parked).
    ended: usize,
}

impl VcpuPause {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU to park; they must then be kicked out of `KVM_RUN`
    /// ([`VcpuThread::kick`]) until [`VcpuPause::parked`] counts them all.
    /// Returns false if the vCPUs were already paused.
    pub fn request(&self) -> bool {
        let mut st = self.lock();
        if st.paused {
            return false;
        }
        st.paused = true;
        st.generation += 1;
        st.parked = 0;
        self.requested.store(true, Ordering::Release);
        true
    }

    /// How many vCPUs are parked (or have ended) since the pause was
    /// requested.
    pub fn parked(&self) -> usize {
        let st = self.lock();
        st.parked + st.ended
    }

    /// Whether the vCPUs are paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Lets the parked vCPUs run again. Returns false if they were not
    /// paused.
    pub fn resume(&self) -> bool {
        let mut st = self.lock();
        if !st.paused {
            return false;
        }
        st.paused = false;
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
        true
    }

    /// Wakes parked threads so they can see the stop flag.
    pub fn wake_all(&self) {
        let _st = self.lock();
        self.changed.notify_all();
    }

    /// Parks the calling vCPU thread while a pause is in force (and the
    /// VM is not stopping).
    fn park(&self, stop: &AtomicBool) {
        let mut st = self.lock();
        let mut counted = None;
        while st.paused && !stop.load(Ordering::Acquire) {
            if counted != Some(st.generation) {
                counted = Some(st.generation);
                st.parked += 1;
            }
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Counts a thread that ended, so a pause does not wait for it.
    fn ended(&self) {
        self.lock().ended += 1;
    }
}

fn dispatch_read(bus: &RwLock<Bus>, addr: u64, data: &mut [u8]) {
    let handled = bus
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .read(addr, data);
    if !handled {
        data.fill(0xff);
    }
}

fn dispatch_write(bus: &RwLock<Bus>, addr: u64, data: &[u8]) {
    // An access nobody claims is dropped, as on a PC bus.
    let _ = bus
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .write(addr, data);
}

/// The suberror of the last `KVM_EXIT_INTERNAL_ERROR`.
fn internal_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, for which KVM
    // fills the `internal` member of the union.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

fn suberror_name(sub: u32) -> &'static str {
    match sub {
        1 => "instruction emulation failed",
        2 => "exception while delivering an exception (a triple fault on some hosts)",
        3 => "could not deliver an event",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// Runs `vcpu` until the VM stops. Returns the reason when this vCPU ended
/// the VM.
fn run_loop(id: u8, vcpu: &mut VcpuFd, ctx: &VcpuContext) -> Option<VmExitReason> {
    let fail = |m: String| Some(VmExitReason::Failed(format!("vCPU {id}: {m}")));
    while !ctx.stop.load(Ordering::Acquire) {
        if ctx.pause.requested.load(Ordering::Acquire) {
            ctx.pause.park(&ctx.stop);
            continue;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => dispatch_read(&ctx.pio, port.into(), data),
            Ok(VcpuExit::IoOut(port, data)) => dispatch_write(&ctx.pio, port.into(), data),
            Ok(VcpuExit::MmioRead(addr, data)) => dispatch_read(&ctx.mmio, addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => dispatch_write(&ctx.mmio, addr, data),
            Ok(VcpuExit::Shutdown) => {
                return fail("triple fault (KVM_EXIT_SHUTDOWN)".into());
            }
            Ok(VcpuExit::Hlt) => {
                return fail("halted with no in-kernel irqchip to wake it (KVM_EXIT_HLT)".into());
            }
            Ok(VcpuExit::InternalError) => {
                let sub = internal_suberror(vcpu);
                return fail(format!(
                    "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {sub}: {})",
                    suberror_name(sub)
                ));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return fail(format!(
                    "entry failed (KVM_EXIT_FAIL_ENTRY), hardware reason {reason:#x} on host CPU {cpu}"
                ));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => Some(VmExitReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => fail("guest crashed (KVM_SYSTEM_EVENT_CRASH)".into()),
                    k => fail(format!("unexpected system event {k}")),
                };
            }
            Ok(other) => return fail(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return fail(format!("KVM_RUN failed: {e}")),
        }
    }
    None
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

impl VcpuThread {
    /// Starts vCPU `id` on its own thread.
    pub fn spawn(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                sandbox::enter(sandbox::ThreadKind::Vcpu);
                let reason = run_loop(id, &mut vcpu, &ctx);
                ctx.pause.ended();
                if let Some(reason) = reason {
                    let _ = ctx.exits.send(reason);
                }
            })
            .map_err(|e| VcpuError::Thread(id, e))?;
        Ok(VcpuThread { handle })
    }

    /// Kicks the thread out of `KVM_RUN` once (a kick that lands outside
    /// `KVM_RUN` is lost: callers repeat until the thread did what they
    /// asked).
    pub fn kick(&self) {
        if !self.handle.is_finished() {
            let _ = self.handle.kill(kick_signal());
        }
    }

    /// Kicks the thread out of `KVM_RUN` until it ends (the stop flag must
    /// be set), for at most `timeout`. Returns whether it ended.
    pub fn stop(self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while !self.handle.is_finished() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            // A kick that lands outside KVM_RUN is lost; the loop kicks
            // again until the thread sees the flag.
            let _ = self.handle.kill(kick_signal());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = self.handle.join();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    use super::*;

    /// Threads that do what a vCPU loop does with the pause state, and
    /// count their "runs".
    fn spawn(
        n: usize,
        pause: &Arc<VcpuPause>,
        stop: &Arc<AtomicBool>,
    ) -> (Vec<Arc<AtomicU64>>, Vec<std::thread::JoinHandle<()>>) {
        let mut counters = Vec::new();
        let mut handles = Vec::new();
        for _ in 0..n {
            let (p, s, c) = (pause.clone(), stop.clone(), Arc::new(AtomicU64::new(0)));
            counters.push(c.clone());
            handles.push(std::thread::spawn(move || {
                while !s.load(Ordering::Acquire) {
                    if p.requested.load(Ordering::Acquire) {
                        p.park(&s);
                        continue;
                    }
                    c.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                }
                p.ended();
            }));
        }
        (counters, handles)
    }

    fn wait_parked(p: &VcpuPause, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.parked() < n {
            assert!(Instant::now() < deadline, "only {} parked", p.parked());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn total(c: &[Arc<AtomicU64>]) -> u64 {
        c.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    #[test]
    fn paused_threads_park_until_resumed_and_every_pause_counts_them_again() {
        let pause = Arc::new(VcpuPause::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (counters, handles) = spawn(3, &pause, &stop);
        for _ in 0..3 {
            assert!(pause.request());
            assert!(!pause.request(), "a second request is a no-op");
            wait_parked(&pause, 3);
            assert!(pause.is_paused());
            let before = total(&counters);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(total(&counters), before, "a parked thread ran");
            assert!(pause.resume());
            assert!(!pause.resume(), "resuming twice is a no-op");
            let deadline = Instant::now() + Duration::from_secs(5);
            while total(&counters) == before {
                assert!(Instant::now() < deadline, "nothing ran after resume");
                std::thread::yield_now();
            }
        }
        // Stopping wakes parked threads, and ended ones count as parked.
        assert!(pause.request());
        wait_parked(&pause, 3);
        stop.store(true, Ordering::Release);
        pause.wake_all();
        for h in handles {
            h.join().unwrap();
        }
        assert!(pause.resume());
        assert!(pause.request());
        assert_eq!(pause.parked(), 3);
    }
}
