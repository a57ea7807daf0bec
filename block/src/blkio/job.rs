//! Requests that cannot go to libblkio as they are, planned as a sequence
//! of steps through one bounce buffer: buffers outside mapped memory or
//! misaligned for the device, offsets or lengths that break the request
//! alignment (read-modify-write of the edge blocks), transfers larger than
//! the device takes, write-zeroes the device cannot do, and discards larger
//! than it takes.
//!
//! A [`Job`] only does arithmetic: the queue issues each [`Step`], and
//! moves bytes between the caller's iovecs and the bounce buffer as each
//! [`Fill`] says. Steps run one at a time, so a job needs one buffer
//! however large the request is.

use crate::request::RequestOp;

/// What a queue's device takes, as the planner needs it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    /// Offsets and lengths sent to the device are multiples of this.
    pub align: u64,
    /// Bounce buffer size: the largest read or write step (a multiple of
    /// `align`).
    pub chunk: u64,
    /// Largest write-zeroes step; 0 when the device has none (emulated by
    /// writing zeroes).
    pub max_write_zeroes: u64,
    /// Largest discard step; 0 when the device cannot discard.
    pub max_discard: u64,
}

impl Geometry {
    fn down(&self, x: u64) -> u64 {
        x / self.align * self.align
    }

    fn up(&self, x: u64) -> u64 {
        x.div_ceil(self.align).saturating_mul(self.align)
    }

    /// Whether a request needs no read-modify-write.
    pub fn is_aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.align) && len.is_multiple_of(self.align)
    }
}

/// The part of a step's buffer that belongs to the request: `n` bytes at
/// `buf_off` in the buffer, `skip` bytes into the request's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Fill {
    pub buf_off: usize,
    pub skip: usize,
    pub n: usize,
}

/// One device operation of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Read `len` bytes at `offset` into the buffer.
    Read { offset: u64, len: usize },
    /// Fill the buffer (request data for writes, zeroes for write-zeroes),
    /// then write `len` bytes of it at `offset`.
    Write { offset: u64, len: usize, fill: Fill },
    /// Zero a range on the device.
    WriteZeroes { offset: u64, len: u64 },
    /// Discard a range on the device.
    Discard { offset: u64, len: u64 },
}

/// The plan of one request.
#[derive(Debug)]
pub(super) struct Job {
    op: RequestOp,
    /// The request's own range.
    start: u64,
    end: u64,
    /// Next byte of the device range still to do, and the device range's end.
    pos: u64,
    stop: u64,
    /// A chunk read for read-modify-write, still to be written.
    rmw: Option<(u64, u64)>,
    /// After the read step in flight: what to copy out (plain reads).
    copy_out: Option<Fill>,
    /// Reads blocks it then writes back.
    is_rmw: bool,
}

impl Job {
    /// Plans `op` on `len` bytes at `offset`. Discards shrink inward to
    /// the alignment (they are advisory); everything else grows outward.
    pub fn new(op: RequestOp, offset: u64, len: u64, geo: &Geometry) -> Job {
        let end = offset.saturating_add(len);
        let (pos, stop) = match op {
            RequestOp::Discard => (geo.up(offset), geo.down(end)),
            _ => (geo.down(offset), geo.up(end)),
        };
        let stop = stop.max(pos);
        Job {
            op,
            start: offset,
            end,
            pos,
            stop,
            rmw: None,
            copy_out: None,
            is_rmw: matches!(op, RequestOp::Write | RequestOp::WriteZeroes)
                && (pos < offset || stop > end),
        }
    }

    /// Whether there is nothing to do on the device.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.stop
    }

    /// The request's operation.
    pub fn op(&self) -> RequestOp {
        self.op
    }

    /// Whether it reads blocks it then writes back (an unaligned write):
    /// such a job runs alone on its queue, so no other write of the queue
    /// can land between its read and its write.
    pub fn is_rmw(&self) -> bool {
        self.is_rmw
    }

    /// Whether any step uses the bounce buffer.
    pub fn needs_buffer(&self, geo: &Geometry) -> bool {
        match self.op {
            RequestOp::Discard | RequestOp::Flush => false,
            RequestOp::WriteZeroes => geo.max_write_zeroes == 0 || self.is_rmw(),
            RequestOp::Read | RequestOp::Write => true,
        }
    }

    /// The part of chunk `[c0, c1)` that belongs to the request.
    fn overlap(&self, c0: u64, c1: u64) -> Fill {
        let o0 = c0.max(self.start);
        let o1 = c1.min(self.end).max(o0);
        Fill {
            buf_off: (o0 - c0) as usize,
            skip: (o0 - self.start) as usize,
            n: (o1 - o0) as usize,
        }
    }

    /// Whether chunk `[c0, c1)` holds bytes outside the request.
    fn partial(&self, c0: u64, c1: u64) -> bool {
        c0 < self.start || c1 > self.end
    }

    /// After a read step: the bytes to copy to the caller (plain reads only;
    /// a read-modify-write goes on with [`Job::next`]).
    pub fn take_copy_out(&mut self) -> Option<Fill> {
        self.copy_out.take()
    }

    /// The next step, or `None` when the job is done.
    pub fn next(&mut self, geo: &Geometry) -> Option<Step> {
        if let Some((c0, c1)) = self.rmw.take() {
            return Some(self.write(c0, c1));
        }
        if self.pos >= self.stop {
            return None;
        }
        let pos = self.pos;
        let step = match self.op {
            RequestOp::Read => {
                let c1 = self.stop.min(pos.saturating_add(geo.chunk));
                self.copy_out = Some(self.overlap(pos, c1));
                self.pos = c1;
                Step::Read {
                    offset: pos,
                    len: (c1 - pos) as usize,
                }
            }
            RequestOp::Write => {
                let c1 = self.stop.min(pos.saturating_add(geo.chunk));
                self.data_chunk(pos, c1)
            }
            RequestOp::WriteZeroes => {
                let block_end = pos.saturating_add(geo.align);
                if self.partial(pos, block_end) {
                    self.data_chunk(pos, block_end)
                } else if geo.max_write_zeroes == 0 {
                    let c1 = geo.down(self.end).min(pos.saturating_add(geo.chunk));
                    self.data_chunk(pos, c1)
                } else {
                    let c1 = geo
                        .down(self.end)
                        .min(pos.saturating_add(geo.max_write_zeroes));
                    self.pos = c1;
                    Step::WriteZeroes {
                        offset: pos,
                        len: c1 - pos,
                    }
                }
            }
            RequestOp::Discard => {
                let c1 = self.stop.min(pos.saturating_add(geo.max_discard.max(1)));
                self.pos = c1;
                Step::Discard {
                    offset: pos,
                    len: c1 - pos,
                }
            }
            RequestOp::Flush => {
                self.pos = self.stop;
                return None;
            }
        };
        Some(step)
    }

    /// A chunk written from the buffer: read first if it is partial.
    fn data_chunk(&mut self, c0: u64, c1: u64) -> Step {
        self.pos = c1;
        if self.partial(c0, c1) {
            self.rmw = Some((c0, c1));
            return Step::Read {
                offset: c0,
                len: (c1 - c0) as usize,
            };
        }
        self.write(c0, c1)
    }

    fn write(&self, c0: u64, c1: u64) -> Step {
        Step::Write {
            offset: c0,
            len: (c1 - c0) as usize,
            fill: self.overlap(c0, c1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry {
        align: 512,
        chunk: 4096,
        max_write_zeroes: 1 << 20,
        max_discard: 1 << 20,
    };

    fn steps(op: RequestOp, offset: u64, len: u64, geo: &Geometry) -> Vec<Step> {
        let mut job = Job::new(op, offset, len, geo);
        std::iter::from_fn(|| job.next(geo)).collect()
    }

    #[test]
    fn aligned_read_is_cut_into_chunks() {
        let s = steps(RequestOp::Read, 0, 10000 / 512 * 512, &GEO);
        let lens: Vec<_> = s
            .iter()
            .map(|s| match s {
                Step::Read { len, .. } => *len,
                _ => panic!("{s:?}"),
            })
            .collect();
        assert_eq!(lens, vec![4096, 4096, 1536]);
    }

    #[test]
    fn unaligned_read_covers_whole_blocks_and_copies_only_the_request() {
        let mut job = Job::new(RequestOp::Read, 700, 100, &GEO);
        assert!(!job.is_rmw());
        assert_eq!(
            job.next(&GEO),
            Some(Step::Read {
                offset: 512,
                len: 512
            })
        );
        let fill = job.take_copy_out().unwrap();
        assert_eq!(
            fill,
            Fill {
                buf_off: 188,
                skip: 0,
                n: 100
            }
        );
        assert_eq!(job.next(&GEO), None);
    }

    #[test]
    fn unaligned_write_reads_then_writes_each_partial_chunk() {
        let s = steps(RequestOp::Write, 1, 5000, &GEO);
        assert!(Job::new(RequestOp::Write, 1, 5000, &GEO).is_rmw());
        assert_eq!(
            s,
            vec![
                Step::Read {
                    offset: 0,
                    len: 4096
                },
                Step::Write {
                    offset: 0,
                    len: 4096,
                    fill: Fill {
                        buf_off: 1,
                        skip: 0,
                        n: 4095
                    }
                },
                Step::Read {
                    offset: 4096,
                    len: 1024
                },
                Step::Write {
                    offset: 4096,
                    len: 1024,
                    fill: Fill {
                        buf_off: 0,
                        skip: 4095,
                        n: 905
                    }
                },
            ]
        );
    }

    #[test]
    fn aligned_write_needs_no_read() {
        let s = steps(RequestOp::Write, 4096, 8192, &GEO);
        assert!(s.iter().all(|s| matches!(s, Step::Write { .. })));
        assert_eq!(s.len(), 2);
        assert!(!Job::new(RequestOp::Write, 4096, 8192, &GEO).is_rmw());
    }

    #[test]
    fn unaligned_write_zeroes_zeroes_edges_by_hand_and_the_middle_on_the_device() {
        let s = steps(RequestOp::WriteZeroes, 100, 2000, &GEO);
        assert_eq!(s.len(), 5, "{s:?}");
        assert!(matches!(
            s[0],
            Step::Read {
                offset: 0,
                len: 512
            }
        ));
        assert!(matches!(
            s[1],
            Step::Write {
                offset: 0,
                fill: Fill {
                    buf_off: 100,
                    n: 412,
                    ..
                },
                ..
            }
        ));
        assert_eq!(
            s[2],
            Step::WriteZeroes {
                offset: 512,
                len: 1536
            }
        );
        assert!(matches!(
            s[3],
            Step::Read {
                offset: 2048,
                len: 512
            }
        ));
        assert!(matches!(
            s[4],
            Step::Write {
                offset: 2048,
                fill: Fill {
                    buf_off: 0,
                    n: 52,
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn write_zeroes_without_device_support_writes_zero_chunks() {
        let geo = Geometry {
            max_write_zeroes: 0,
            ..GEO
        };
        let job = Job::new(RequestOp::WriteZeroes, 0, 10240, &geo);
        assert!(job.needs_buffer(&geo));
        let s = steps(RequestOp::WriteZeroes, 0, 10240, &geo);
        let lens: Vec<_> = s
            .iter()
            .map(|s| match s {
                Step::Write { len, fill, .. } => {
                    assert_eq!(fill.n, *len);
                    *len
                }
                _ => panic!("{s:?}"),
            })
            .collect();
        assert_eq!(lens, vec![4096, 4096, 2048]);
    }

    #[test]
    fn large_aligned_write_zeroes_is_split_at_the_device_limit() {
        let s = steps(RequestOp::WriteZeroes, 0, 5 << 19, &GEO);
        assert_eq!(
            s,
            vec![
                Step::WriteZeroes {
                    offset: 0,
                    len: 1 << 20
                },
                Step::WriteZeroes {
                    offset: 1 << 20,
                    len: 1 << 20
                },
                Step::WriteZeroes {
                    offset: 2 << 20,
                    len: 1 << 19
                },
            ]
        );
        assert!(!Job::new(RequestOp::WriteZeroes, 0, 5 << 19, &GEO).needs_buffer(&GEO));
    }

    #[test]
    fn discard_shrinks_inward_and_may_vanish() {
        assert!(Job::new(RequestOp::Discard, 1, 1000, &GEO).is_empty());
        assert_eq!(
            steps(RequestOp::Discard, 1, 2000, &GEO),
            vec![Step::Discard {
                offset: 512,
                len: 1024
            }]
        );
    }

    #[test]
    fn request_ending_at_u64_max_does_not_overflow() {
        let mut job = Job::new(RequestOp::Write, u64::MAX - 10, 10, &GEO);
        let mut n = 0;
        while job.next(&GEO).is_some() {
            n += 1;
            assert!(n < 10, "runaway plan");
        }
    }
}
