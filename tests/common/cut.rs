//! A store behind a [`TcpProxy`] that can cut its one connection, beside a
//! store straight to the server to look at the rows: for the tests of
//! writes whose reply is lost.

use std::sync::OnceLock;

use trebuchet_postgres::testing::{ProxyRequest, TcpProxy, TestCluster};
use trebuchet_postgres::{PoolOptions, StateStore, StateStoreBuilder};

/// One cluster for the cut tests of a test binary; each test has its own
/// proxy and table.
pub fn cluster() -> &'static TestCluster {
    static CLUSTER: OnceLock<TestCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| TestCluster::start().expect("start a throwaway cluster"))
}

pub struct Rig {
    pub proxy: TcpProxy,
    /// Through the proxy, one connection, so that the cut hits it.
    pub store: StateStore,
    /// Straight to the server, to look at the rows.
    pub direct: StateStore,
}

impl Rig {
    pub fn new(table: &str) -> Rig {
        Self::with(table, |b| b.group_commit(false))
    }

    pub fn with(
        table: &str,
        configure: impl FnOnce(StateStoreBuilder) -> StateStoreBuilder,
    ) -> Rig {
        let cluster = cluster();
        let direct = StateStore::builder()
            .connect_options(cluster.connect_options())
            .table(table)
            .channel(table)
            .group_commit(false)
            .migrate(true)
            .build()
            .expect("direct store");
        let proxy = TcpProxy::start(cluster.port()).expect("proxy");
        let mut options = cluster.connect_options();
        options.port(proxy.port());
        let store = configure(
            StateStore::builder()
                .connect_options(options)
                .table(table)
                .channel(table)
                .pool_options(PoolOptions::default().max_size(1).min_idle(Some(0))),
        )
        .build()
        .expect("store through the proxy");
        Rig {
            proxy,
            store,
            direct,
        }
    }

    /// Runs `op` with the connection cut right after the `nth` matching
    /// request was answered.
    pub fn after<T>(
        &self,
        request: ProxyRequest,
        nth: usize,
        op: impl FnOnce(&StateStore) -> T,
    ) -> T {
        self.warm();
        let cuts = self.proxy.cuts();
        self.proxy.cut_after_nth(request, nth);
        let result = op(&self.store);
        assert_eq!(self.proxy.cuts(), cuts + 1, "the cut happened");
        result
    }

    /// Runs `op` with the `nth` matching request dropped before the server
    /// saw it.
    pub fn before<T>(
        &self,
        request: ProxyRequest,
        nth: usize,
        op: impl FnOnce(&StateStore) -> T,
    ) -> T {
        self.warm();
        let cuts = self.proxy.cuts();
        self.proxy.cut_before_nth(request, nth);
        let result = op(&self.store);
        assert_eq!(self.proxy.cuts(), cuts + 1, "the cut happened");
        result
    }

    /// Makes sure the store's one connection is open, so that a cut lands
    /// on the operation and not on the set-up of a new connection.
    pub fn warm(&self) {
        self.store.exists("warm-up").unwrap();
    }

    /// An actor's `u32` state and sequence number, read straight from the
    /// server.
    pub fn version(&self, id: &str) -> Option<(u32, u64)> {
        self.direct
            .load_versioned::<u32>(id)
            .unwrap()
            .map(|v| (v.value, v.sequence))
    }
}
