//! Whether notifications reach a listener: [`StateStore::notify_round_trip`].

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use fallible_iterator::FallibleIterator;
use postgres::types::Type;

use crate::change::PROBE_KEY;
use crate::config::{listen_through_transaction_pooler, PoolerMode};
use crate::error::{Error, Result};
use crate::ident::quote_identifier;
use crate::pool::Sql;
use crate::store::StateStore;

/// A notification sent by hand, to time a round trip.
pub(super) static NOTIFY: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "SELECT pg_notify($1::TEXT, $2::TEXT)",
        &[Type::TEXT, Type::TEXT],
    )
});

impl StateStore {
    /// Sends a probe notification on the store's channel from a pooled
    /// connection and waits up to `timeout` for it to arrive on a fresh
    /// listening connection: the seed's "test manually" step of
    /// "Notifications Not Received". Returns the round-trip time, or `None`
    /// when the probe did not arrive in time.
    ///
    /// The probe reaches every session listening on the channel.
    /// [`ChangeListener`](crate::ChangeListener)s skip it; other listeners
    /// (the seed's Swift adapter) see a payload without an `actorID` and
    /// should ignore it.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let store = trebuchet_postgres::StateStore::from_env()?;
    /// match store.notify_round_trip(Duration::from_secs(5))? {
    ///     Some(rtt) => println!("notifications arrive in {rtt:?}"),
    ///     None => eprintln!("no notification within 5 s: check the channel and LISTEN"),
    /// }
    /// # Ok::<(), trebuchet_postgres::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] when the listening connection cannot be opened;
    /// [`Error::InvalidConfig`] through a transaction-mode pooler, where
    /// `LISTEN` does not work; connection and database errors.
    pub fn notify_round_trip(&self, timeout: Duration) -> Result<Option<Duration>> {
        let options = self.pool().connect_options();
        if options.get_pooler() == PoolerMode::Transaction {
            return Err(listen_through_transaction_pooler());
        }
        let mut listener = options.connect()?;
        listener
            .batch_execute(&format!("LISTEN {}", quote_identifier(self.channel())))
            .map_err(Error::Database)?;
        let payload = format!("{{\"{PROBE_KEY}\":\"{:016x}\"}}", fastrand::u64(..));
        let channel = self.channel().to_owned();
        let start = Instant::now();
        self.call(false, |_, c| {
            c.prepare(&NOTIFY)?
                .execute(&mut c.client, &[&channel, &payload])?;
            Ok(())
        })?;
        loop {
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                return Ok(None);
            };
            match listener.notifications().timeout_iter(left).next() {
                Ok(Some(n)) if n.payload() == payload => return Ok(Some(start.elapsed())),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(None),
                Err(e) => return Err(Error::ConnectionLost(std::sync::Arc::new(e))),
            }
        }
    }
}
