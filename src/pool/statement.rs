//! Statements as data: each statement's text and the types of its
//! parameters, declared where it is written and built once (per store, or
//! once per process for the fixed ones), with an identity by which every
//! connection keeps it prepared. Nothing reads parameter types out of SQL
//! text at run time, and no cache is keyed by a string's address.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Row, Statement, Transaction};

/// One statement: its text, its parameters' types, and an identity.
pub(crate) struct Sql {
    /// Unique in the process (0: not kept prepared, see [`Sql::once`]).
    id: u64,
    text: Box<str>,
    types: Box<[Type]>,
}

/// The identity of the next statement made.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Sql {
    /// A statement that connections prepare once and keep: built once per
    /// store (or once per process), never per call.
    pub(crate) fn new(text: impl Into<String>, types: &[Type]) -> Sql {
        Sql {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            text: text.into().into_boxed_str(),
            types: types.into(),
        }
    }

    /// A statement made for one call (its text holds a name read from the
    /// catalog): sent unnamed with its types, never kept prepared, so that
    /// texts made per call do not pile up on connections.
    pub(crate) fn once(text: impl Into<String>, types: &[Type]) -> Sql {
        Sql {
            id: 0,
            text: text.into().into_boxed_str(),
            types: types.into(),
        }
    }

    /// The SQL text.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The types of `$1`, `$2`, ...
    pub(crate) fn types(&self) -> &[Type] {
        &self.types
    }

    /// Whether connections keep it prepared.
    pub(super) fn is_cached(&self) -> bool {
        self.id != 0
    }
}

impl fmt::Debug for Sql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A connection's prepared statements, found by their statement's identity.
#[derive(Default)]
pub(super) struct StatementCache {
    by_id: HashMap<u64, Statement, BuildHasherDefault<IdHasher>>,
}

impl StatementCache {
    pub(super) fn get(&self, sql: &Sql) -> Option<&Statement> {
        self.by_id.get(&sql.id)
    }

    pub(super) fn insert(&mut self, sql: &Sql, statement: Statement) {
        self.by_id.insert(sql.id, statement);
    }

    pub(super) fn clear(&mut self) {
        self.by_id.clear();
    }
}

/// Hashes a statement's identity: one multiply, as in rustc's `FxHasher`
/// (the key is a counter, not attacker input).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A statement ready to run on a connection or on one of its transactions:
/// the choke point through which every statement of the store goes.
pub(crate) enum Prepared<'a> {
    /// Prepared once and cached: each call is bind and execute.
    Named(Statement),
    /// Sent as an unnamed statement with its parameter types on every call.
    Unnamed { sql: &'a str, types: &'a [Type] },
}

impl Prepared<'_> {
    /// Runs the statement and returns its rows.
    pub fn query(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.query(statement, params),
            Prepared::Unnamed { sql, types } => client.query_typed(sql, &typed(params, types)),
        }
    }

    /// Runs the statement, which must return exactly one row.
    pub fn query_one(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.query_one(statement, params),
            Prepared::Unnamed { sql, types } => client.query_typed_one(sql, &typed(params, types)),
        }
    }

    /// Runs the statement, which must return at most one row.
    pub fn query_opt(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.query_opt(statement, params),
            Prepared::Unnamed { sql, types } => client.query_typed_opt(sql, &typed(params, types)),
        }
    }

    /// Runs the statement and returns how many rows it changed.
    pub fn execute(
        &self,
        client: &mut impl GenericClient,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        match self {
            Prepared::Named(statement) => client.execute(statement, params),
            Prepared::Unnamed { sql, types } => client.execute_typed(sql, &typed(params, types)),
        }
    }

    /// Binds the statement to a portal of `transaction`, to read its rows a
    /// batch at a time. (Unnamed, the text is prepared inside the
    /// transaction, where even a transaction-mode pooler keeps one server
    /// connection.)
    pub fn bind(
        &self,
        transaction: &mut Transaction<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<postgres::Portal, postgres::Error> {
        match self {
            Prepared::Named(statement) => transaction.bind(statement, params),
            Prepared::Unnamed { sql, .. } => transaction.bind(*sql, params),
        }
    }
}

/// Pairs parameters with their types for an unnamed statement.
fn typed<'p>(
    params: &[&'p (dyn ToSql + Sync)],
    types: &[Type],
) -> Vec<(&'p (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .zip(types.iter().cloned())
        .map(|(param, ty)| (*param, ty))
        .collect()
}

#[cfg(test)]
/// The parameter types of `sql`, read from the cast of each parameter's
/// first appearance (`$1::VARCHAR`, `$2::BYTEA[]`): `None` when a parameter
/// has no cast or names a type this crate does not send.
pub(crate) fn param_types(sql: &str) -> Option<Vec<Type>> {
    let mut types: Vec<Option<Type>> = Vec::new();
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let digits = bytes[i + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            i += 1;
            continue;
        }
        let n: usize = sql[i + 1..i + 1 + digits].parse().ok()?;
        i += 1 + digits;
        if n == 0 {
            return None;
        }
        if types.len() < n {
            types.resize(n, None);
        }
        let Some(rest) = sql[i..].strip_prefix("::") else {
            continue;
        };
        let name_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let array = rest[name_len..].starts_with("[]");
        if types[n - 1].is_none() {
            types[n - 1] = Some(type_named(&rest[..name_len], array)?);
        }
    }
    types.into_iter().collect()
}

/// The types this crate's statements cast their parameters to.
#[cfg(test)]
fn type_named(name: &str, array: bool) -> Option<Type> {
    let ty = match (name.to_ascii_uppercase().as_str(), array) {
        ("VARCHAR", false) => Type::VARCHAR,
        ("VARCHAR", true) => Type::VARCHAR_ARRAY,
        ("TEXT", false) => Type::TEXT,
        ("TEXT", true) => Type::TEXT_ARRAY,
        ("BYTEA", false) => Type::BYTEA,
        ("BYTEA", true) => Type::BYTEA_ARRAY,
        ("BIGINT" | "INT8", false) => Type::INT8,
        ("BIGINT" | "INT8", true) => Type::INT8_ARRAY,
        ("INT" | "INTEGER" | "INT4", false) => Type::INT4,
        ("INT" | "INTEGER" | "INT4", true) => Type::INT4_ARRAY,
        ("OID", false) => Type::OID,
        ("NAME", false) => Type::NAME,
        ("BOOL" | "BOOLEAN", false) => Type::BOOL,
        ("BOOL" | "BOOLEAN", true) => Type::BOOL_ARRAY,
        ("FLOAT8", false) => Type::FLOAT8,
        ("TIMESTAMP", false) => Type::TIMESTAMP,
        ("TIMESTAMP", true) => Type::TIMESTAMP_ARRAY,
        ("TIMESTAMPTZ", false) => Type::TIMESTAMPTZ,
        _ => return None,
    };
    Some(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_have_their_own_identity_and_one_call_statements_none() {
        let a = Sql::new("SELECT 1", &[]);
        let b = Sql::new("SELECT 1", &[]);
        assert!(a.is_cached() && b.is_cached());
        assert_ne!(a.id, b.id, "the same text twice is two statements");
        assert!(!Sql::once("SELECT 1", &[]).is_cached());
    }

    #[test]
    fn parameter_types_come_from_the_first_cast() {
        assert_eq!(
            param_types("SELECT $1::VARCHAR, $2::BYTEA[], $3::BIGINT, $2, $1").unwrap(),
            [Type::VARCHAR, Type::BYTEA_ARRAY, Type::INT8]
        );
        assert_eq!(
            param_types("SELECT set_config('x', $2::BIGINT::TEXT, true), $1::timestamp[]").unwrap(),
            [Type::TIMESTAMP_ARRAY, Type::INT8]
        );
        assert_eq!(param_types("SELECT 1").unwrap(), []);
        assert_eq!(
            param_types("SELECT $1::NAME, $2::OID").unwrap(),
            [Type::NAME, Type::OID]
        );
    }

    #[test]
    fn a_parameter_without_a_cast_has_no_type() {
        assert_eq!(param_types("SELECT $1"), None);
        assert_eq!(param_types("SELECT $2::TEXT"), None);
        assert_eq!(param_types("SELECT $1::POINT"), None);
        assert_eq!(param_types("SELECT $0::TEXT"), None);
    }
}
