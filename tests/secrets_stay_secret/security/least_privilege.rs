//! Least privilege: a login role with only the grants of the guide's "Least
//! privilege" (`guide::schema`) uses every operation and the listener, and
//! `migrate`, or a missing grant on the tombstone table, gives a typed error
//! that says which grants it needs.

use crate::common;

use common::{admin, trust_cluster};

use std::fmt::Debug;

use trebuchet_postgres::postgres::Client;
use trebuchet_postgres::testing::TestCluster;
use trebuchet_postgres::{
    ChangeKind, ConnectOptions, Error, Event, Expected, PoolOptions, StateCache, StateStore,
    Versioned, WriteOptions,
};

use super::{terminate_sessions, WAIT};

// ----- least privilege ------------------------------------------------------------

/// A schema migrated by its owner and a login role without DDL rights,
/// both removed at the end.
struct Restricted {
    admin: Client,
    schema: String,
    role: String,
    cluster: &'static TestCluster,
}

impl Restricted {
    fn new() -> Restricted {
        let cluster = trust_cluster();
        let mut admin = admin(cluster);
        let schema = common::unique("lp");
        let role = common::unique("dml");
        admin
            .batch_execute(&format!("CREATE SCHEMA {schema}; CREATE ROLE {role} LOGIN"))
            .unwrap();
        Restricted {
            admin,
            schema,
            role,
            cluster,
        }
    }

    fn table(&self, name: &str) -> String {
        format!("{}.{name}", self.schema)
    }

    /// A store on `name` in the schema, connecting as `user`.
    fn builder(&self, user: &str, name: &str) -> trebuchet_postgres::StateStoreBuilder {
        let mut options: ConnectOptions = self.cluster.connect_options();
        options.user(user).application_name(&self.role);
        StateStore::builder()
            .connect_options(options)
            .pool_options(PoolOptions::default().max_size(3))
            .table(self.table(name))
            .channel(format!("{}_changes", self.schema))
    }
}

impl Drop for Restricted {
    fn drop(&mut self) {
        let _ = terminate_sessions(&mut self.admin, &self.role);
        let _ = self.admin.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}",
            schema = self.schema,
            role = self.role
        ));
    }
}

#[track_caller]
fn expect_insufficient_privilege<T: Debug>(
    what: &str,
    result: trebuchet_postgres::Result<T>,
) -> Error {
    match result {
        Err(err @ Error::InsufficientPrivilege { .. }) => {
            assert_eq!(
                err.sql_state().map(|c| c.code()),
                Some("42501"),
                "{what}: {err:?}"
            );
            assert!(
                err.to_string().starts_with("insufficient privilege"),
                "{what}: {err}"
            );
            assert!(!err.is_connection() && !err.is_invalid_input(), "{what}");
            err
        }
        other => panic!("{what}: expected Error::InsufficientPrivilege, got {other:?}"),
    }
}

/// The grants of the guide's "Least privilege" (`guide::schema`): SELECT, INSERT, UPDATE and DELETE on the table,
/// SELECT, INSERT and UPDATE on its tombstone table, USAGE on the schema.
/// With them and nothing more, every operation and the listener work, and
/// `migrate` fails with a typed error that says what to do.
#[test]
fn least_privilege_role_works_but_cannot_migrate() {
    let mut r = Restricted::new();
    let owner = r
        .builder("postgres", "actor_states")
        .migrate(true)
        .build()
        .unwrap();
    owner.save("from-owner", &1u32).unwrap();
    let (schema, role) = (r.schema.clone(), r.role.clone());
    r.admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {schema} TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.actor_states TO {role}; \
             GRANT SELECT, INSERT, UPDATE ON {schema}.actor_states_tombstones TO {role}"
        ))
        .unwrap();
    let may_create: bool = r
        .admin
        .query_one(
            "SELECT has_schema_privilege($1, $2, 'CREATE') OR has_database_privilege($1, current_database(), 'CREATE')",
            &[&role, &schema],
        )
        .unwrap()
        .get(0);
    assert!(!may_create, "the role must not be able to create anything");

    let store = r
        .builder(&role, "actor_states")
        .build()
        .expect("the role connects");
    let listener = store.listener().expect("the role listens");
    let all = listener.subscribe();
    let one = listener.subscribe_actor("a");
    let cache: StateCache<u32> = StateCache::new(&store, &listener).unwrap();

    // Single-actor operations.
    assert_eq!(store.save("a", &1u32).unwrap(), 1);
    assert_eq!(store.load::<u32>("a").unwrap(), Some(1));
    assert_eq!(
        store.load_versioned::<u32>("a").unwrap().unwrap().sequence,
        1
    );
    assert_eq!(store.save_if("a", &2u32, Expected::Sequence(1)).unwrap(), 2);
    assert_eq!(store.save_if("b", &1u32, Expected::Absent).unwrap(), 1);
    assert!(store
        .save_if("b", &1u32, Expected::Absent)
        .unwrap_err()
        .is_conflict());
    store
        .save_with("c", &1u32, WriteOptions::new().sequence(10))
        .unwrap();
    let t = store
        .transform("a", |n: Option<u32>| n.unwrap_or(0) + 1)
        .unwrap();
    assert_eq!((t.value, t.sequence), (3, 3));
    assert!(store.exists("a").unwrap());
    assert_eq!(store.sequence("c").unwrap(), Some(10));
    assert_eq!(cache.get("a").unwrap().as_deref(), Some(&3));
    // A delete records a tombstone through the trigger; a new save reads it.
    assert!(store.delete("a").unwrap());
    assert_eq!(store.save("a", &9u32).unwrap(), 5);
    for (sequence, kind) in [
        (1, ChangeKind::Saved),
        (2, ChangeKind::Saved),
        (3, ChangeKind::Saved),
        (4, ChangeKind::Deleted),
        (5, ChangeKind::Saved),
    ] {
        common::expect_change(&one, "a", sequence, kind);
    }
    assert_eq!(store.raw().save("raw", b"raw").unwrap(), 1);
    assert_eq!(
        store.raw().load("raw").unwrap().as_deref(),
        Some(&b"raw"[..])
    );
    store
        .raw()
        .transform("raw", |b| b.map(<[u8]>::to_vec).unwrap_or_default())
        .unwrap();

    // Bulk operations and batches.
    assert_eq!(
        store.save_many(&[("m1", 1u32), ("m2", 2u32)]).unwrap(),
        [1, 1]
    );
    assert_eq!(
        store.load_many::<u32, _>(&["m1", "m2", "none"]).unwrap(),
        [Some(1), Some(2), None]
    );
    let results = store
        .save_many_if(&[
            ("m1", 5u32, Expected::Sequence(1)),
            ("m3", 3u32, Expected::Absent),
        ])
        .unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(
        store.delete_many(&["m1", "m2", "none"]).unwrap(),
        [true, true, false]
    );
    let results = store
        .batch()
        .save("b1", &1u32)
        .save_if("b", &2u32, Expected::Sequence(1))
        .delete("c")
        .commit()
        .unwrap();
    assert_eq!(results.len(), 3);

    // Listing, export and import.
    let page = store.list_actors("", None, 100).unwrap();
    assert!(page.actors.iter().any(|a| a.actor_id == "from-owner"));
    assert_eq!(store.count_actors("m").unwrap(), 1);
    let mut exported = Vec::new();
    store
        .raw()
        .for_each("", |id, v| {
            exported.push((id, v));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert!(!exported.is_empty());
    let restored: Vec<(String, Versioned<Vec<u8>>)> = exported
        .into_iter()
        .map(|(id, v)| (format!("copy-{id}"), v))
        .collect();
    store.raw().restore_many(&restored).unwrap();

    // Checks and monitoring.
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    let info = store.connection_info().unwrap();
    assert_eq!(info.user, role);
    assert!(info.missing_privileges.is_empty(), "{info:?}");
    store.stats().unwrap();
    assert!(store.notify_round_trip(WAIT).unwrap().is_some());

    // Every change reached the unfiltered subscriber too.
    let mut seen = 0;
    while seen < 15 {
        match all.recv_timeout(WAIT) {
            Ok(Event::Change(_)) => seen += 1,
            Ok(_) => {}
            Err(e) => panic!("only {seen} changes arrived: {e:?}"),
        }
    }
    assert_eq!(listener.health().malformed, 0);

    // migrate: a typed error naming the privilege and what to do, on the
    // migrated table, through the builder, and on a new table; nothing made.
    let err = expect_insufficient_privilege("migrate", store.migrate());
    let text = err.to_string();
    for needle in ["migrate", "owner", "42501"] {
        assert!(text.contains(needle), "say {needle:?}: {text}");
    }
    expect_insufficient_privilege(
        "builder migrate(true)",
        r.builder(&role, "actor_states").migrate(true).build(),
    );
    let fresh = r.builder(&role, "fresh").build().unwrap();
    expect_insufficient_privilege("migrate a new table", fresh.migrate());
    let made: bool = r
        .admin
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&r.table("fresh")])
        .unwrap()
        .get(0);
    assert!(!made);
    // The store still works after the refused migration.
    assert_eq!(store.load::<u32>("a").unwrap(), Some(9));
    listener.shutdown();
}

/// Without the grants on the tombstone table, `connection_info` (and so
/// `trebuchet-postgres doctor`) says what is missing, and a delete fails
/// with a typed error that names the grants, leaving the row in place.
#[test]
fn missing_tombstone_grants_are_reported() {
    let mut r = Restricted::new();
    let owner = r
        .builder("postgres", "actor_states")
        .migrate(true)
        .build()
        .unwrap();
    owner.save("kept", &1u32).unwrap();
    let (schema, role) = (r.schema.clone(), r.role.clone());
    r.admin
        .batch_execute(&format!(
            "GRANT USAGE ON SCHEMA {schema} TO {role}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.actor_states TO {role}"
        ))
        .unwrap();
    let store = r.builder(&role, "actor_states").build().unwrap();
    let info = store.connection_info().unwrap();
    assert!(info.missing_privileges.is_empty(), "{info:?}");
    assert_eq!(
        info.missing_tombstone_privileges,
        ["SELECT", "INSERT", "UPDATE"],
        "{info:?}"
    );
    let err = expect_insufficient_privilege("delete", store.delete("kept"));
    let text = err.to_string();
    assert!(text.contains("GRANT"), "say which grants: {text}");
    assert!(text.contains("tombstones"), "{text}");
    assert_eq!(owner.load::<u32>("kept").unwrap(), Some(1));
    expect_insufficient_privilege("save of a new actor", store.save("new", &1u32));
    assert!(!owner.exists("new").unwrap());
    // Reads do not touch the tombstones.
    assert_eq!(store.load::<u32>("kept").unwrap(), Some(1));
}
