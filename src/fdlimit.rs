//! File descriptors: raise the soft limit, and fit the connection caps in it.
//!
//! Every socket is a file descriptor. Under systemd the soft `RLIMIT_NOFILE`
//! is 1024 while the hard limit is far higher, so a node that keeps the soft
//! limit runs out near 1,000 sockets (`accept failed: Too many open files`,
//! every client locked out) although `WSGATE_MAX_CONNECTIONS` says 20,000.
//! At start-up [`raise`] sets the soft limit to the hard one (allowed
//! without privileges), and [`fit`] checks that the caps fit in it:
//!
//! ```text
//! WSGATE_MAX_CONNECTIONS + WSGATE_MAX_PENDING_CONNECTIONS + HEADROOM <= limit
//! ```
//!
//! [`HEADROOM`] covers what is not a client socket: stdio, the listener,
//! the runtime's epoll and wake-up descriptors, the Redis connections (the
//! pub/sub one, the command one, and a replacement while reconnecting), the
//! authorisation callback's pooled connections, a PEM file being read, and
//! the refusals lingering at accept (at most [`crate::pending::MAX_LINGERING`]).
//!
//! When the caps do not fit: a default is lowered to what fits (the pending
//! cap first, to a quarter of what is available, then the connection cap to
//! the rest) and the log says so; a value the operator set explicitly is
//! never lowered: start-up stops with exit code 2 and what would fit.

/// Descriptors kept for everything that is not a client connection (see
/// the module docs).
pub const HEADROOM: u64 = 256;

/// The open-file limits before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// Soft limit found at start.
    pub soft_before: u64,
    /// Soft limit now (the hard limit, when raising worked).
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and reports both.
/// An infinite hard limit is not a valid soft value on Linux, which caps
/// descriptors at `fs.nr_open`: the soft limit then goes to that cap.
// `rlim_t` is u64 on Linux but not everywhere: the casts are for portability.
#[allow(clippy::unnecessary_cast)]
pub fn raise() -> std::io::Result<FdLimits> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; no other memory.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur as u64;
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(lim.rlim_cur.max(1 << 20));
    }
    if target > lim.rlim_cur {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = target;
    }
    Ok(FdLimits {
        soft_before,
        soft: lim.rlim_cur as u64,
        hard: lim.rlim_max as u64,
    })
}

/// The caps as requested: values, and whether the operator set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// `WSGATE_MAX_CONNECTIONS`.
    pub connections: usize,
    /// Whether it was set explicitly.
    pub connections_set: bool,
    /// `WSGATE_MAX_PENDING_CONNECTIONS`.
    pub pending: usize,
    /// Whether it was set explicitly.
    pub pending_set: bool,
}

/// Why the caps cannot run under the descriptor limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{var}={value} does not fit in the open-file limit of {limit} \
     (needs WSGATE_MAX_CONNECTIONS + WSGATE_MAX_PENDING_CONNECTIONS + {HEADROOM} descriptors; \
     at most {fits} fits): lower it, or raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, \
     docker --ulimit nofile=)"
)]
pub struct FitError {
    /// The variable that cannot be honoured.
    pub var: &'static str,
    /// Its value.
    pub value: usize,
    /// The soft limit it was checked against.
    pub limit: u64,
    /// The largest value that would fit (0: none).
    pub fits: usize,
}

/// Fits `caps` in `limit` descriptors (see the module docs): the caps to
/// run with, or why they cannot be honoured.
pub fn fit(limit: u64, caps: Caps) -> Result<Caps, FitError> {
    let available = usize::try_from(limit.saturating_sub(HEADROOM)).unwrap_or(usize::MAX);
    let mut out = caps;
    if !caps.pending_set && caps.pending > available / 4 {
        out.pending = (available / 4).max(1);
    }
    if out.connections.saturating_add(out.pending) <= available {
        return Ok(out);
    }
    if caps.pending_set && caps.pending >= available {
        return Err(FitError {
            var: "WSGATE_MAX_PENDING_CONNECTIONS",
            value: caps.pending,
            limit,
            fits: available.saturating_sub(1),
        });
    }
    let fits = available.saturating_sub(out.pending);
    if caps.connections_set || fits == 0 {
        return Err(FitError {
            var: "WSGATE_MAX_CONNECTIONS",
            value: caps.connections,
            limit,
            fits,
        });
    }
    out.connections = fits;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(connections: usize, connections_set: bool, pending: usize, pending_set: bool) -> Caps {
        Caps {
            connections,
            connections_set,
            pending,
            pending_set,
        }
    }

    #[test]
    fn defaults_fit_a_large_limit_unchanged() {
        let c = caps(20_000, false, 1024, false);
        assert_eq!(fit(1 << 20, c), Ok(c));
        // Exactly enough.
        assert_eq!(fit(20_000 + 1024 + HEADROOM, c), Ok(c));
    }

    #[test]
    fn defaults_are_lowered_to_what_fits() {
        // This machine: hard limit 20,000.
        let got = fit(20_000, caps(20_000, false, 1024, false)).unwrap();
        assert_eq!(got, caps(20_000 - 1024 - 256, false, 1024, false));
        // systemd's soft 1024 when the hard limit is 1024 too.
        let got = fit(1024, caps(20_000, false, 1024, false)).unwrap();
        assert_eq!(got, caps(768 - 192, false, 192, false));
        assert!(got.connections + got.pending + HEADROOM as usize <= 1024);
    }

    #[test]
    fn explicit_values_that_do_not_fit_are_refused() {
        let err = fit(20_000, caps(20_000, true, 1024, false)).unwrap_err();
        assert_eq!(
            (err.var, err.value, err.fits),
            ("WSGATE_MAX_CONNECTIONS", 20_000, 18_720)
        );
        assert!(err.to_string().contains("at most 18720 fits"), "{err}");
        let err = fit(2000, caps(100, true, 5000, true)).unwrap_err();
        assert_eq!(err.var, "WSGATE_MAX_PENDING_CONNECTIONS");
        // An explicit pending cap that fits lowers the default connection cap.
        let got = fit(2000, caps(20_000, false, 1000, true)).unwrap();
        assert_eq!(got, caps(2000 - 256 - 1000, false, 1000, true));
        // Explicit and fitting: kept.
        let c = caps(1000, true, 100, true);
        assert_eq!(fit(2000, c), Ok(c));
    }

    #[test]
    fn a_limit_below_the_headroom_is_refused() {
        assert!(fit(100, caps(20_000, false, 1024, false)).is_err());
    }

    #[test]
    #[allow(clippy::unnecessary_cast)]
    fn raising_reaches_the_hard_limit() {
        let l = raise().unwrap();
        assert!(l.soft >= l.soft_before);
        if l.hard != libc::RLIM_INFINITY as u64 {
            assert_eq!(l.soft, l.hard);
        }
    }
}
