//! A server stopped while 4 client processes call it in a loop exits 0, and every client's
//! calls end with the "server is gone" error; none hangs. No GPU needed: manual mode in
//! the local role (`gpu_shutdown` runs the same cycles in the server role on a GPU).

#[path = "shutdown_cycles.rs"]
mod shutdown_cycles;

use shutdown_cycles::{cycle, Stop, Tally};

#[test]
fn sigterm_under_load_exits_zero_and_every_client_sees_the_server_gone() {
    let mut tally = Tally::default();
    for _ in 0..5 {
        cycle(false, Stop::Sigterm, &mut tally);
    }
    println!("{tally:?}");
    assert_eq!(tally.gone + tally.unreachable, 20);
}

#[test]
fn shutdown_under_load_exits_zero_and_every_client_sees_the_server_gone() {
    let mut tally = Tally::default();
    for _ in 0..5 {
        cycle(false, Stop::Shutdown, &mut tally);
    }
    println!("{tally:?}");
    assert_eq!(tally.gone + tally.unreachable, 20);
}
