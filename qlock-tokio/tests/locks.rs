//! qlock-tokio against real processes and real files: the scenarios of
//! `qlock_async::testing` (shared with qlock-async-std), on a multi-threaded tokio runtime.

mod common;

use common::Tokio;

qlock_async::scenario_tests!(Tokio);
