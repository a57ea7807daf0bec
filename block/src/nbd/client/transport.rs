//! What a connection runs over: a socket ([`Socket`]), or TLS on one
//! ([`Transport::Tls`], after NBD_OPT_STARTTLS). The queue's hot path asks
//! the transport to send iovecs and to read bytes, and the transport does
//! it with one system call on a plain socket, or through rustls.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::nbd::tls::{ClientConnection, TlsStream};
use crate::sys;

/// A connected socket, blocking or not.
#[derive(Debug)]
pub struct Socket(OwnedFd);

impl Socket {
    /// Makes reads and writes return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let fd = self.0.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets the receive and send timeouts of blocking calls.
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(t) => libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: a valid timeval of the size given, on our socket.
            let r = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Ends both directions (the peer sees EOF).
    pub fn shutdown(&self) {
        // SAFETY: shutdown on our socket; errors (not connected) are moot.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of its length. MSG_NOSIGNAL:
        // a closed peer is an error, not a SIGPIPE.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<OwnedFd> for Socket {
    fn from(fd: OwnedFd) -> Self {
        Socket(fd)
    }
}

/// A negotiated connection's byte stream.
pub enum Transport {
    /// Plain NBD.
    Plain(Socket),
    /// NBD over TLS.
    Tls(Box<TlsStream<ClientConnection, Socket>>),
}

/// Bytes of iovec data encrypted per call (rustls copies them anyway).
const TLS_CHUNK: usize = 64 << 10;

impl Transport {
    fn socket(&self) -> &Socket {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => t.get_ref(),
        }
    }

    /// The socket's descriptor, for epoll.
    pub fn fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }

    /// Whether reads may go straight into the caller's buffers.
    pub fn is_plain(&self) -> bool {
        matches!(self, Transport::Plain(_))
    }

    /// See [`Socket::set_nonblocking`].
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.socket().set_nonblocking(on)
    }

    /// See [`Socket::set_timeout`].
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_timeout(t)
    }

    /// Ends the connection (a TLS close_notify first, if it goes out).
    pub fn shutdown(&mut self) {
        if let Transport::Tls(t) = self {
            t.close();
        }
        self.socket().shutdown();
    }

    /// Sends from `iov`: returns the bytes taken (`WouldBlock` if none).
    pub fn send(&mut self, iov: &[libc::iovec], scratch: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => {
                // SAFETY: a zeroed msghdr is valid; we set its iovec array.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = iov.len() as _;
                // SAFETY: the caller's iovecs are valid for reads (request
                // buffers until completion, or its own bytes). MSG_NOSIGNAL:
                // a closed peer is an error, not SIGPIPE.
                let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(n as usize)
            }
            Transport::Tls(t) => {
                // Copied out of guest-visible memory first (no slice over
                // it), a chunk at a time; rustls keeps what it takes.
                let total: usize = iov.iter().map(|v| v.iov_len).sum();
                scratch.resize(total.min(TLS_CHUNK), 0);
                sys::copy_from_iovecs(iov, 0, scratch);
                t.write(scratch)
            }
        }
    }

    /// Whether encrypted bytes wait for the socket (keep EPOLLOUT).
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.wants_write(),
        }
    }

    /// Pushes what TLS holds to the socket (`WouldBlock` if it is full).
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(t) => t.flush_tls(),
        }
    }

    /// Reads straight into `iov` (plain sockets only).
    pub fn readv(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's iovecs are valid for writes (request
        // buffers until completion).
        let n = unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(t) => t.flush_tls(),
        }
    }
}
