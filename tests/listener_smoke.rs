use std::time::Duration;
use trebuchet_postgres::testing::TestDatabase;
use trebuchet_postgres::{ChangeKind, Event, StateCache};

#[test]
fn smoke() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    let listener = store.listener().unwrap();
    let all = listener.subscribe();
    let one = listener.subscribe_actor("b");
    store.save("a", &1u32).unwrap();
    store.save("b", &2u32).unwrap();
    store.delete("a").unwrap();
    let t = Duration::from_secs(5);
    let e1 = all.recv_timeout(t).unwrap();
    let e2 = all.recv_timeout(t).unwrap();
    let e3 = all.recv_timeout(t).unwrap();
    println!("{e1:?}\n{e2:?}\n{e3:?}");
    match e3 {
        Event::Change(c) => {
            assert_eq!(c.kind, ChangeKind::Deleted);
            assert_eq!(c.sequence, 2);
        }
        _ => panic!(),
    }
    match one.recv_timeout(t).unwrap() {
        Event::Change(c) => assert_eq!(c.actor_id, "b"),
        e => panic!("{e:?}"),
    }
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();
    assert_eq!(cache.get("b").unwrap().as_deref(), Some(&2));
    store.save("b", &3u32).unwrap();
    for _ in 0..100 {
        if cache.get("b").unwrap().as_deref() == Some(&3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(cache.get("b").unwrap().as_deref(), Some(&3));
    // terminate the listener backend
    let mut c = schema.client().unwrap();
    c.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    store.save("b", &4u32).unwrap();
    let start = std::time::Instant::now();
    loop {
        match all.recv_timeout(t) {
            Ok(e) => {
                println!("all: {e:?}");
                if matches!(e, Event::Resync(_)) {
                    break;
                }
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    println!(
        "resync after {:?}, health {:?}",
        start.elapsed(),
        listener.health()
    );
    match one.recv_timeout(t).unwrap() {
        e => println!("one: {e:?}"),
    }
    for _ in 0..100 {
        if cache.get("b").unwrap().as_deref() == Some(&4) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "cache b = {:?} seq {:?} store {:?}",
        cache.get("b").unwrap(),
        cache.sequence("b"),
        store.load_versioned::<u32>("b").unwrap()
    );
    assert_eq!(cache.get("b").unwrap().as_deref(), Some(&4));
    let s = std::time::Instant::now();
    drop(cache);
    listener.shutdown();
    println!("shutdown {:?}", s.elapsed());
    while all.try_recv().is_ok() {}
    assert!(all.recv_timeout(t).is_err());
}
