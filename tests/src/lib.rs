//! Integration tests for the `blkvm` binary live in `tests/tests/`; this
//! library is empty.
