//! Names read back from the catalog (indexes, constraints, triggers,
//! partitions, schemas, roles) go into SQL text quoted, whatever they hold:
//! an index named to close its quotes and run a statement of its own is
//! renamed, not run. Every library call and every command that reads names
//! from the catalog is run against such names; none may create the table
//! the names try to create, and each works (or fails with a typed error).

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use trebuchet_postgres::testing::{TestDatabase, TestSchema};
use trebuchet_postgres::{ConnectOptions, Problem, StateStore};

/// A name that, spliced into SQL between double quotes without doubling
/// the one it holds, ends the identifier and creates a table `pwned`.
const PAYLOAD: &str = "evil\"; CREATE TABLE pwned(x int); --";

/// Names that break SQL text in other ways: quotes of both kinds, a
/// doubled quote, semicolons, comments, spaces, a dollar quote, non-ASCII.
const ODD: [&str; 8] = [
    "it's",
    "a\"b",
    "a\"\"b",
    "semi;colon -- comment",
    "two  spaces ",
    "Mixed\"Case'; DROP TABLE x; --",
    "dollar$$; CREATE TABLE pwned(x int); --",
    "ünï \"cödé\" /* c */",
];

/// `name` as a PostgreSQL identifier, written out here so that the test
/// does not rely on the quoting it checks.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Every relation named like `pwned`, in any schema.
fn pwned(admin: &mut postgres::Client) -> Vec<String> {
    admin
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname LIKE 'pwned%'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[track_caller]
fn assert_not_pwned(admin: &mut postgres::Client, after: &str) {
    let found = pwned(admin);
    assert!(
        found.is_empty(),
        "{after} ran SQL hidden in a catalog name: it created {found:?}"
    );
}

/// The names of the indexes on `table` (`schema.name`, quoted as needed),
/// and of its partitions' indexes.
fn index_names(admin: &mut postgres::Client, table: &str) -> BTreeSet<String> {
    admin
        .query(
            "SELECT c.relname::TEXT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = to_regclass($1)",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn seed(store: &StateStore) {
    for i in 0..20 {
        store.save(&format!("actor-{i}"), &i).unwrap();
    }
    store.delete("actor-0").unwrap();
}

#[track_caller]
fn assert_seeded(store: &StateStore) {
    assert_eq!(store.count_actors("").unwrap(), 19);
    assert_eq!(store.load::<i32>("actor-7").unwrap(), Some(7));
    assert_eq!(store.load::<i32>("actor-0").unwrap(), None);
}

/// Runs every library call that reads names from the catalog, checking
/// after each that nothing hidden in a name ran.
fn every_library_call(store: &StateStore, admin: &mut postgres::Client) {
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    assert_not_pwned(admin, "migrate");
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    assert_not_pwned(admin, "verify");
    let before = store.partitions().unwrap();
    assert_not_pwned(admin, "partitions");
    let done = store.partition_table(3).unwrap();
    assert_not_pwned(admin, "partition_table(3)");
    assert_eq!(done.previous, before);
    assert!(done.changed);
    assert_eq!(done.rows, 19);
    let done = store.partition_table(2).unwrap();
    assert_not_pwned(admin, "partition_table(2)");
    assert_eq!((done.previous, done.rows), (Some(3), 19));
    assert_eq!(store.partitions().unwrap(), Some(2));
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{report}");
    assert_not_pwned(admin, "verify of the partitioned table");
    assert_eq!(store.migrate().unwrap(), Vec::<i32>::new());
    assert_not_pwned(admin, "migrate of the partitioned table");
    let stats = store.stats().unwrap();
    assert_eq!((stats.actors, stats.tombstones), (19, 1));
    store.stats_over(Duration::from_millis(50)).unwrap();
    assert_not_pwned(admin, "stats");
    let info = store.connection_info().unwrap();
    assert!(info.table_exists && info.missing_privileges.is_empty());
    assert_not_pwned(admin, "connection_info");
    let rtt = store.notify_round_trip(Duration::from_secs(20)).unwrap();
    assert!(rtt.is_some(), "the probe came back");
    store.sweep_expired(100).unwrap();
    store.purge_tombstones(Duration::from_secs(3600)).unwrap();
    assert_not_pwned(admin, "sweep_expired and purge_tombstones");
    let page = store.list_actors("actor-1", None, 100).unwrap();
    assert_eq!(page.actors.len(), 11);
    assert_seeded(store);
    store.save("actor-0", &0).unwrap();
    assert_eq!(store.sequence("actor-0").unwrap(), Some(3));
    store.delete("actor-0").unwrap();
    assert_not_pwned(admin, "reads and writes");
}

/// The exact payload as an index name: `partition_table` renames the index
/// of the new table to it, which must rename, not run.
#[test]
fn an_index_named_to_inject_sql_is_renamed_not_run() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    seed(&store);
    let table = format!("{}.actor_states", ident(schema.name()));
    let mut admin = schema.client().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE INDEX {} ON {table} (created_at)",
            ident(PAYLOAD)
        ))
        .unwrap();
    every_library_call(&store, &mut admin);
    assert!(
        index_names(&mut admin, &table).contains(PAYLOAD),
        "the index keeps its name: {:?}",
        index_names(&mut admin, &table)
    );
    assert_seeded(&store);
}

/// Indexes, a unique and a check constraint, a disabled trigger, a grant
/// and a partition, each with an odd name, on a table converted twice: all
/// of them come through with their names.
#[test]
fn odd_names_of_indexes_constraints_triggers_grants_and_partitions_come_through() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    seed(&store);
    let s = ident(schema.name());
    let table = format!("{s}.actor_states");
    let mut admin = schema.client().unwrap();
    let mut ddl = String::new();
    for (i, name) in ODD.iter().enumerate() {
        let column = ["created_at", "updated_at", "sequence_number"][i % 3];
        ddl.push_str(&format!(
            "CREATE INDEX {} ON {table} ({column});\n",
            ident(name)
        ));
    }
    let grantee = "grantee \"; DROP TABLE pwned; --";
    ddl.push_str(&format!(
        "ALTER TABLE {table} ADD CONSTRAINT {} UNIQUE (actor_id, sequence_number);\n\
         ALTER TABLE {table} ADD CONSTRAINT {} CHECK (sequence_number >= 0);\n\
         CREATE FUNCTION {s}.noop() RETURNS TRIGGER AS $fn$ BEGIN RETURN NEW; END $fn$ \
         LANGUAGE plpgsql;\n\
         CREATE TRIGGER {trigger} BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {s}.noop();\n\
         ALTER TABLE {table} DISABLE TRIGGER {trigger};\n\
         DO $do$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {role_literal}) THEN \
         CREATE ROLE {role}; END IF; END $do$;\n\
         GRANT SELECT ON {table} TO {role};",
        ident("unique \"'; --"),
        ident("check\"; CREATE TABLE pwned(x int); --"),
        trigger = ident("trigger\"; CREATE TABLE pwned(x int); --"),
        role_literal = literal(grantee),
        role = ident(grantee),
    ));
    admin.batch_execute(&ddl).unwrap();
    every_library_call(&store, &mut admin);

    let indexes = index_names(&mut admin, &table);
    for name in ODD.iter().chain(&["unique \"'; --"]) {
        assert!(indexes.contains(*name), "{name:?} kept: {indexes:?}");
    }
    let kept: (bool, bool, bool) = admin
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) \
             AND conname = $2), \
             EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $3 \
             AND tgenabled = 'D'), has_table_privilege($4, to_regclass($1), 'SELECT')",
            &[
                &table,
                &"check\"; CREATE TABLE pwned(x int); --",
                &"trigger\"; CREATE TABLE pwned(x int); --",
                &grantee,
            ],
        )
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(
        kept,
        (true, true, true),
        "constraint, disabled trigger, grant"
    );

    // A partition with an odd name whose trigger is off: verify names it,
    // quoted, and converting the table goes past it.
    let partition = "part\"; CREATE TABLE pwned(x int); --";
    admin
        .batch_execute(&format!(
            "ALTER TABLE {s}.actor_states_p1 RENAME TO {p};\n\
             ALTER TABLE {s}.{p} DISABLE TRIGGER actor_state_change_trigger",
            p = ident(partition)
        ))
        .unwrap();
    let report = store.verify().unwrap();
    assert_not_pwned(&mut admin, "verify");
    assert_eq!(
        report.problems,
        vec![Problem::PartitionTriggerDisabled {
            partition: format!("{}.{}", schema.name(), ident(partition)),
            trigger: "actor_state_change_trigger".into(),
        }]
    );
    store.stats().unwrap();
    assert_not_pwned(&mut admin, "stats");
    assert!(store.partition_table(4).unwrap().changed);
    assert_not_pwned(&mut admin, "partition_table(4)");
    assert!(store.verify().unwrap().is_ok());
    assert_seeded(&store);
}

/// The test server's URL with the search_path set to `schema` alone.
fn search_path_url(schema: &str) -> String {
    let url = TestDatabase::shared().url();
    // libpq's options: `-c search_path=...`, spaces escaped with a backslash.
    let option = format!("-c search_path={}", ident(schema).replace(' ', "\\ "));
    let encoded: String = option
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options={encoded}")
}

/// Connection options whose search_path is `schema` alone.
fn in_search_path(schema: &str) -> ConnectOptions {
    search_path_url(schema).parse().unwrap()
}

/// A schema of the test's own with an odd name, dropped afterwards.
struct OddSchema<'a> {
    name: &'a str,
    admin: postgres::Client,
}

impl<'a> OddSchema<'a> {
    fn create(owner: &TestSchema, name: &'a str) -> OddSchema<'a> {
        let mut admin = owner.client().unwrap();
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {s} CASCADE; CREATE SCHEMA {s}",
                s = ident(name)
            ))
            .unwrap();
        OddSchema { name, admin }
    }
}

impl Drop for OddSchema<'_> {
    fn drop(&mut self) {
        let _ = self.admin.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            ident(self.name)
        ));
    }
}

/// The table in a schema with an odd name, found through the search path
/// (table names given to a store are checked, but the schema the server
/// puts an unqualified table in is read from the catalog): the migrations,
/// whose function body is dollar-quoted, the conversion and verify quote it.
#[test]
fn a_schema_with_an_odd_name_found_through_the_search_path_is_quoted() {
    let owner = TestDatabase::shared().schema();
    for (i, name) in [PAYLOAD, ODD[6], ODD[5], ODD[7]].into_iter().enumerate() {
        let odd = OddSchema::create(&owner, name);
        let store = StateStore::builder()
            .connect_options(in_search_path(name))
            .channel(format!("{}_{i}", owner.channel()))
            .migrate(true)
            .build()
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        let mut admin = owner.client().unwrap();
        assert_not_pwned(&mut admin, "migrate");
        let table = format!("{}.actor_states", ident(name));
        assert_eq!(
            index_names(&mut admin, &table).len(),
            4,
            "the table is in {name:?}"
        );
        seed(&store);
        every_library_call(&store, &mut admin);
        assert_seeded(&store);
        drop(odd);
    }
}

// ----- the command-line program ----------------------------------------------

/// What one run printed and how it ended.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Exits 0 with no failed check.
    #[track_caller]
    fn succeeded(&self, args: &[&str]) {
        assert!(
            self.code == Some(0) && !self.stdout.contains("FAIL"),
            "{args:?} exited {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
    }
}

/// The program with `args`, the URL, the table and the channel, in an empty
/// directory and without connection variables.
fn cli(dir: &Path, url: &str, table: &str, channel: &str, args: &[&str]) -> Run {
    let mut command = support::bare(dir);
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .args(args)
        .args(["--url", url, "--table", table, "--channel", channel])
        .stdin(Stdio::null())
        .output()
        .expect("run the program");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Every command that reads names from the catalog, then the ones that
/// read and write actors; each must succeed and run nothing hidden in a name.
fn every_command(
    admin: &mut postgres::Client,
    url: &str,
    table: &str,
    channel: &str,
    exported_to: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("actors.jsonl");
    let export = export.to_str().unwrap();
    let steps: [&[&str]; 20] = [
        &["migrate"],
        &["verify", "--timeout", "20"],
        &["doctor", "--timeout", "20"],
        &["partition", "--partitions", "3"],
        &["partition", "--partitions", "2"],
        &["migrate"],
        &["verify", "--timeout", "20"],
        &["doctor", "--timeout", "20"],
        &["stats", "--window", "0"],
        &["stats", "--json", "--window", "0.1"],
        &["sweep"],
        &["purge-tombstones", "--older-than", "1d"],
        &["put", "cli-actor", "{\"round\":1}"],
        &["get", "cli-actor"],
        &["seq", "cli-actor"],
        &["ls"],
        &["export", "--output", export],
        &["delete", "cli-actor"],
        &["partition", "--partitions", "4"],
        &["verify", "--timeout", "20"],
    ];
    for args in steps {
        let run = cli(dir.path(), url, table, channel, args);
        assert_not_pwned(admin, &format!("trebuchet-postgres {}", args.join(" ")));
        run.succeeded(args);
    }
    let into: [&[&str]; 2] = [&["migrate"], &["import", export]];
    for args in into {
        let run = cli(dir.path(), url, exported_to, channel, args);
        assert_not_pwned(admin, &format!("trebuchet-postgres {}", args.join(" ")));
        run.succeeded(args);
    }
}

/// The exact payload alone first (so that, unquoted, it would run), then
/// every odd name too.
#[test]
fn every_command_passes_odd_catalog_names_through_quoted() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    seed(&store);
    let table = format!("{}.actor_states", ident(schema.name()));
    let mut admin = schema.client().unwrap();
    let url = TestDatabase::shared().url();
    let (cli_table, channel) = (schema.table("actor_states"), schema.channel());
    admin
        .batch_execute(&format!(
            "CREATE INDEX {} ON {table} (created_at)",
            ident(PAYLOAD)
        ))
        .unwrap();
    every_command(&mut admin, url, &cli_table, &channel, &schema.table("a"));
    let mut ddl = String::new();
    for name in ODD {
        ddl.push_str(&format!(
            "CREATE INDEX {} ON {table} (updated_at);\n",
            ident(name)
        ));
    }
    admin.batch_execute(&ddl).unwrap();
    every_command(&mut admin, url, &cli_table, &channel, &schema.table("b"));
    let indexes = index_names(&mut admin, &table);
    for name in ODD.iter().chain(&[PAYLOAD]) {
        assert!(indexes.contains(*name), "{name:?} kept: {indexes:?}");
    }
    assert_seeded(&store);
}

#[test]
fn every_command_quotes_a_schema_found_through_the_search_path() {
    let owner = TestDatabase::shared().schema();
    let name = "cli \"; CREATE TABLE pwned(x int); --";
    let _odd = OddSchema::create(&owner, name);
    let url = search_path_url(name);
    let mut admin = owner.client().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let migrated = cli(
        dir.path(),
        &url,
        "actor_states",
        &owner.channel(),
        &["migrate"],
    );
    assert_not_pwned(&mut admin, "trebuchet-postgres migrate");
    migrated.succeeded(&["migrate"]);
    let store = StateStore::builder()
        .connect_options(in_search_path(name))
        .channel(owner.channel())
        .build()
        .unwrap();
    seed(&store);
    every_command(
        &mut admin,
        &url,
        "actor_states",
        &owner.channel(),
        &owner.table("imported"),
    );
    assert_seeded(&store);
}

/// `doctor` run as a role without privileges suggests the `GRANT` that
/// fixes it, with the role's name quoted.
#[test]
fn doctor_quotes_the_role_in_the_grant_it_suggests() {
    let schema = TestDatabase::shared().schema();
    let store = schema.store();
    seed(&store);
    let role = "doctor \"; DROP TABLE pwned; --";
    let mut admin = schema.client().unwrap();
    admin
        .batch_execute(&format!(
            "DO $do$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {}) THEN \
             CREATE ROLE {r} LOGIN; END IF; END $do$; GRANT USAGE ON SCHEMA {} TO {r}",
            literal(role),
            ident(schema.name()),
            r = ident(role),
        ))
        .unwrap();
    let encoded: String = role
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let url = TestDatabase::shared()
        .url()
        .replacen("://postgres@", &format!("://{encoded}@"), 1);
    let dir = tempfile::tempdir().unwrap();
    let run = cli(
        dir.path(),
        &url,
        &schema.table("actor_states"),
        &schema.channel(),
        &["doctor"],
    );
    assert_not_pwned(&mut admin, "trebuchet-postgres doctor");
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}",
            store.table(),
            ident(role)
        )),
        "{run:?}"
    );
    admin
        .batch_execute(&format!(
            "DROP OWNED BY {r}; DROP ROLE {r}",
            r = ident(role)
        ))
        .unwrap();
}
