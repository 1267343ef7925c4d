//! The pool against a real server: which connection a caller gets, and
//! how statements are kept.

use std::sync::mpsc;
use std::thread;

use super::*;
use crate::testing::TestDatabase;

fn pool(max_size: u32) -> Pool {
    let options = PoolOptions::default()
        .max_size(max_size)
        .min_idle(None)
        .connection_timeout(Duration::from_secs(10));
    Pool::new(TestDatabase::shared().connect_options(), options).unwrap()
}

fn pid(pool: &Pool) -> i32 {
    let mut conn = pool.get().unwrap();
    let row = conn
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap();
    row.get(0)
}

#[test]
fn each_thread_gets_back_the_connection_it_used_last() {
    let pool = pool(4);
    // Until r2d2 has opened its connections, a caller that finds none
    // idle takes one parked by another thread rather than wait.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.state().idle < 4 {
        assert!(
            Instant::now() < deadline,
            "r2d2 did not open its connections"
        );
        thread::sleep(Duration::from_millis(5));
    }
    // Two threads taking turns: without affinity the second would get
    // the connection the first just returned.
    let (to_other, from_main) = mpsc::channel::<()>();
    let (to_main, from_other) = mpsc::channel::<i32>();
    let other = {
        let pool = pool.clone();
        thread::spawn(move || {
            let mut seen = Vec::new();
            while from_main.recv().is_ok() {
                let pid = pid(&pool);
                seen.push(pid);
                to_main.send(pid).unwrap();
            }
            seen
        })
    };
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(pid(&pool));
        to_other.send(()).unwrap();
        from_other.recv().unwrap();
    }
    drop(to_other);
    let theirs = other.join().unwrap();
    assert!(
        seen.iter().all(|p| *p == seen[0]),
        "this thread hopped: {seen:?}"
    );
    assert!(
        theirs.iter().all(|p| *p == theirs[0]),
        "the other hopped: {theirs:?}"
    );
    assert_ne!(seen[0], theirs[0]);
    let state = pool.state();
    assert_eq!(
        state.idle, state.connections,
        "parked connections count as idle"
    );
}

#[test]
fn each_statement_is_prepared_once_per_connection_and_found_by_its_identity() {
    let pool = pool(1);
    let mut conn = pool.get().unwrap();
    let run = |conn: &mut Checkout<'_>, sql: &Sql| -> i32 {
        let statement = conn.prepare(sql).unwrap();
        statement.query_one(&mut conn.client, &[]).unwrap().get(0)
    };
    let count = |conn: &mut Checkout<'_>| -> i64 {
        conn.client
            .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
            .unwrap()
            .get(0)
    };
    let before = count(&mut conn);
    let one = Sql::new("SELECT 1::INT4", &[]);
    let two = Sql::new("SELECT 2::INT4", &[]);
    assert_eq!(run(&mut conn, &one), 1);
    assert_eq!(run(&mut conn, &two), 2);
    assert_eq!(run(&mut conn, &one), 1);
    // A statement made again with the same text is another statement.
    drop(one);
    let again = Sql::new("SELECT 3::INT4", &[]);
    assert_eq!(run(&mut conn, &again), 3);
    assert_eq!(
        count(&mut conn) - before,
        3,
        "one server statement per statement used"
    );
    // A statement for one call is never kept.
    let once = Sql::once("SELECT 4::INT4", &[]);
    assert_eq!(run(&mut conn, &once), 4);
    assert_eq!(count(&mut conn) - before, 3);
}

#[test]
fn a_connection_parked_by_another_thread_is_taken_rather_than_waited_for() {
    let pool = pool(1);
    let parked_by = {
        let pool = pool.clone();
        thread::spawn(move || pid(&pool)).join().unwrap()
    };
    // The first call may have waited for the pool's first connection.
    let waits = pool.state().waits;
    assert_eq!(pid(&pool), parked_by);
    assert_eq!(pool.state().waits, waits, "waited for a parked connection");
}

#[test]
fn a_caller_waiting_for_a_connection_gets_the_one_returned() {
    let pool = pool(1);
    let held = pool.get().unwrap();
    // That call may have waited for the pool's first connection.
    let waits = pool.state().waits;
    let holder = held.backend.map(|b| b.pid);
    let waiter = {
        let pool = pool.clone();
        thread::spawn(move || pid(&pool))
    };
    // The waiter is waiting inside r2d2 once the pool counts its wait.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.parking.waiting() == 0 {
        assert!(Instant::now() < deadline, "the waiter never waited");
        thread::sleep(Duration::from_millis(5));
    }
    drop(held);
    let got = waiter.join().unwrap();
    assert_eq!(Some(got), holder);
    assert_eq!(pool.state().waits, waits + 1);
}
