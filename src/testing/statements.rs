//! The statements a store runs for one actor, for tests of how the server
//! runs them.

use crate::StateStore;

/// The SQL of every statement a store runs for one actor, keyed by
/// `actor_id = $1`, by name: `load`, `load_versioned`, `exists`,
/// `sequence`, `save`, `save_if_absent`, `save_if_sequence`,
/// `save_with_sequence` (a save at a given number) and `delete`. For tests of how the server runs them
/// (such as partition pruning); `$1` is the actor id, `$2` the state.
pub fn point_statements(store: &StateStore) -> Vec<(&'static str, String)> {
    // No public method shows a store's SQL, so this reads the crate-private
    // `StateStore::statements` (and `Sql::text`) to list it.
    let sql = store.statements();
    vec![
        ("load", sql.load.text().to_owned()),
        ("load_versioned", sql.load_versioned.text().to_owned()),
        ("exists", sql.exists.text().to_owned()),
        ("sequence", sql.sequence.text().to_owned()),
        ("save", sql.save.text().to_owned()),
        ("save_if_absent", sql.save_if_absent.text().to_owned()),
        ("save_if_sequence", sql.save_if_sequence.text().to_owned()),
        (
            "save_with_sequence",
            sql.save_with_sequence.text().to_owned(),
        ),
        ("delete", sql.delete.text().to_owned()),
    ]
}
