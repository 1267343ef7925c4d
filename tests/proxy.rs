//! The fault-injecting TCP proxy itself: cuts happen where they are armed.

use postgres::NoTls;
use trebuchet_postgres::testing::{ProxyRequest, TcpProxy, TestCluster};

fn client(port: u16) -> postgres::Client {
    postgres::Client::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable"),
        NoTls,
    )
    .expect("connect through the proxy")
}

#[test]
fn cuts_land_before_or_after_the_request() {
    let cluster = TestCluster::start().expect("cluster");
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let mut direct = client(cluster.port());
    direct
        .batch_execute("CREATE TABLE cut (n INT)")
        .expect("create");

    // After: the insert commits, the caller hears nothing.
    let mut through = client(proxy.port());
    let insert = through
        .prepare("INSERT INTO cut VALUES ($1)")
        .expect("prepare");
    proxy.cut_after(ProxyRequest::Statement);
    assert!(through.execute(&insert, &[&1]).is_err());
    assert_eq!(proxy.cuts(), 1);
    let count: i64 = direct
        .query_one("SELECT count(*) FROM cut WHERE n = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "the statement ran although its reply was cut");

    // Before: the insert never reaches the server.
    let mut through = client(proxy.port());
    let insert = through
        .prepare("INSERT INTO cut VALUES ($1)")
        .expect("prepare");
    proxy.cut_before(ProxyRequest::Statement);
    assert!(through.execute(&insert, &[&2]).is_err());
    let count: i64 = direct
        .query_one("SELECT count(*) FROM cut WHERE n = 2", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 0);

    // After a COMMIT: the transaction is committed.
    let mut through = client(proxy.port());
    let mut tx = through.transaction().expect("begin");
    tx.execute("INSERT INTO cut VALUES (3)", &[])
        .expect("insert");
    proxy.cut_after(ProxyRequest::Commit);
    assert!(tx.commit().is_err());
    let count: i64 = direct
        .query_one("SELECT count(*) FROM cut WHERE n = 3", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 1);

    // Before a COMMIT: rolled back.
    let mut through = client(proxy.port());
    let mut tx = through.transaction().expect("begin");
    tx.execute("INSERT INTO cut VALUES (4)", &[])
        .expect("insert");
    proxy.cut_before(ProxyRequest::Commit);
    assert!(tx.commit().is_err());
    // The server notices the closed socket and rolls back; wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let open: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                &[],
            )
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server kept the cut transaction open"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let count: i64 = direct
        .query_one("SELECT count(*) FROM cut WHERE n = 4", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
    assert_eq!(proxy.cuts(), 4);
}

#[test]
fn a_cut_after_waits_for_the_answer_to_its_own_request() {
    let cluster = TestCluster::start().expect("cluster");
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let mut direct = client(cluster.port());
    direct
        .batch_execute("CREATE TABLE answered (n INT)")
        .expect("create");
    for n in 0..40 {
        let mut through = client(proxy.port());
        let insert = through
            .prepare("INSERT INTO answered VALUES ($1)")
            .expect("prepare");
        // Dropping a statement sends `Close` and `Sync` without waiting: their
        // answer is still on its way while the cut request passes, and must
        // not be taken for the cut request's own.
        drop(through.prepare("SELECT 1").expect("prepare"));
        proxy.cut_after(ProxyRequest::Statement);
        assert!(through.execute(&insert, &[&n]).is_err());
        let count: i64 = direct
            .query_one("SELECT count(*) FROM answered WHERE n = $1", &[&n])
            .unwrap()
            .get(0);
        assert_eq!(count, 1, "round {n}: the statement ran to completion");
    }
    assert_eq!(proxy.cuts(), 40);
}

#[test]
fn stall_holds_bytes_and_resume_delivers_them() {
    let cluster = TestCluster::start().expect("cluster");
    let proxy = TcpProxy::start(cluster.port()).expect("proxy");
    let mut through = client(proxy.port());
    proxy.stall();
    let worker = std::thread::spawn(move || {
        let n: i32 = through.query_one("SELECT 7", &[]).unwrap().get(0);
        n
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!worker.is_finished(), "a stalled proxy forwards nothing");
    proxy.resume();
    assert_eq!(worker.join().unwrap(), 7);
    proxy.sever_all();
    assert_eq!(proxy.open_connections(), 0);
}
