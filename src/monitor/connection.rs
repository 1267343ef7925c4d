//! Who a store connects as and what it may do: [`StateStore::connection_info`].

use std::sync::LazyLock;

use postgres::types::Type;

use crate::error::Result;
use crate::pool::Sql;
use crate::store::StateStore;

/// Who and where this session is, and what it may do with the table.
pub(super) static SESSION_INFO: LazyLock<Sql> =
    LazyLock::new(|| Sql::new(SESSION_INFO_TEXT, &[Type::TEXT, Type::TEXT]));

const SESSION_INFO_TEXT: &str = "\
    SELECT current_setting('server_version'), current_user::TEXT, current_database()::TEXT, \
    (SELECT CASE WHEN ssl THEN version || ' ' || cipher END FROM pg_stat_ssl \
     WHERE pid = pg_backend_pid()), \
    to_regclass($1::TEXT) IS NOT NULL, \
    has_table_privilege(to_regclass($1), 'SELECT'), has_table_privilege(to_regclass($1), 'INSERT'), \
    has_table_privilege(to_regclass($1), 'UPDATE'), has_table_privilege(to_regclass($1), 'DELETE'), \
    has_table_privilege(to_regclass($2::TEXT), 'SELECT'), has_table_privilege(to_regclass($2), 'INSERT'), \
    has_table_privilege(to_regclass($2), 'UPDATE')";

/// Who a store connects as and what it may do, from
/// [`StateStore::connection_info`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The server's version (`server_version`, such as `"16.4"`).
    pub server_version: String,
    /// The role connected as.
    pub user: String,
    /// The database connected to.
    pub database: String,
    /// The TLS version and cipher, or `None` when the connection is not
    /// encrypted.
    pub tls: Option<String>,
    /// Whether the table exists.
    pub table_exists: bool,
    /// Which of `SELECT`, `INSERT`, `UPDATE` and `DELETE` the role lacks on
    /// the table (empty when the table does not exist).
    pub missing_privileges: Vec<&'static str>,
    /// The quoted, qualified tombstone table.
    pub tombstone_table: String,
    /// Which of `SELECT`, `INSERT` and `UPDATE` the role lacks on the
    /// tombstone table, which saves read and the trigger writes on deletes
    /// (empty when that table does not exist).
    pub missing_tombstone_privileges: Vec<&'static str>,
}

impl StateStore {
    /// The server's version, the role and database connected to, whether
    /// the connection is encrypted, and the role's privileges on the table
    /// and its tombstone table:
    /// the first things to check when something fails.
    ///
    /// ```no_run
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// let info = store.connection_info()?;
    /// println!("{} as {} on {}", info.server_version, info.user, info.database);
    /// if !info.missing_privileges.is_empty() {
    ///     eprintln!("missing on the table: {}", info.missing_privileges.join(", "));
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// Connection and database errors.
    pub fn connection_info(&self) -> Result<ConnectionInfo> {
        let table = self.table();
        self.call(true, |core, c| {
            let tombstones = core.names().qualify(&core.names().tombstones);
            let row = c
                .prepare(&SESSION_INFO)?
                .query_one(&mut c.client, &[&table, &tombstones])?;
            let missing = |first: usize, privileges: &[&'static str]| -> Vec<&'static str> {
                privileges
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| row.get::<_, Option<bool>>(first + i) == Some(false))
                    .map(|(_, privilege)| *privilege)
                    .collect()
            };
            let missing_privileges = missing(5, &["SELECT", "INSERT", "UPDATE", "DELETE"]);
            let missing_tombstone_privileges = missing(9, &["SELECT", "INSERT", "UPDATE"]);
            Ok(ConnectionInfo {
                server_version: row.get(0),
                user: row.get(1),
                database: row.get(2),
                tls: row.get(3),
                table_exists: row.get(4),
                missing_privileges,
                tombstone_table: tombstones,
                missing_tombstone_privileges,
            })
        })
    }
}
