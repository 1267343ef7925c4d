//! Guarantee 3 of the design, **Nothing is lost on a fault**:
//!
//! > A save that returned `Ok` is committed. A save that returned `Err`
//! > never half-applied. Pool connections broken by a server restart are
//! > replaced without the caller seeing more than one error.
//!
//! Each test runs on a cluster of its own or through a TCP proxy that stalls
//! or cuts connections, never on the shared server:
//!
//! - `faults`: the server restarts and every pooled backend is terminated
//!   while eight threads save and a listener listens; in its submodules, a
//!   process killed mid-transform and mid-batch (`faults::killed_process`),
//!   and a server that starts after the program or a network that stalls
//!   (`faults::unreachable_server`);
//! - `restart`: a server restart costs each caller at most one error, and
//!   an acknowledged save is durable;
//! - `outcome`: a write whose connection drops after it was sent finds out
//!   whether it landed, for each kind of write, and processes count exactly
//!   across a restart and a crash.

mod common;
#[path = "nothing_is_lost_on_a_fault/faults.rs"]
mod faults;
#[path = "nothing_is_lost_on_a_fault/outcome.rs"]
mod outcome;
#[path = "nothing_is_lost_on_a_fault/restart.rs"]
mod restart;
