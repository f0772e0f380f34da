//! Diagnostics on stderr, which the backend sends to the console log on the
//! host. Errors and warnings always; one line per exec at debug level.

use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::log::debug_enabled() {
            eprintln!("airlock-guest: debug: {}", format_args!($($t)*));
        }
    };
}
macro_rules! warning {
    ($($t:tt)*) => { eprintln!("airlock-guest: warning: {}", format_args!($($t)*)) };
}
macro_rules! error {
    ($($t:tt)*) => { eprintln!("airlock-guest: error: {}", format_args!($($t)*)) };
}
pub(crate) use {debug, error, warning};
