//! One benchmark: the server, the store, and the cases run side by side.

use super::*;

// ----- the benchmark -----------------------------------------------------------

pub(crate) struct Bench {
    pub(crate) opts: Options,
    /// The server, for the bare driver's connections.
    pub(crate) url: String,
    pub(crate) admin: postgres::Client,
    pub(crate) store: StateStore,
    /// The same table and pool, with group commit on.
    pub(crate) grouped: StateStore,
    pub(crate) app_name: String,
    pub(crate) table_sql: String,
    pub(crate) sql: LibrarySql,
    pub(crate) pgbench: Option<Pgbench>,
    pub(crate) state: Vec<u8>,
    pub(crate) bytea_literal: String,
    pub(crate) next_delete_id: u64,
    /// Operations whose statement text was seen in pg_stat_activity.
    pub(crate) verified: Vec<Op>,
    /// Text the library ran that the benchmark does not know.
    pub(crate) sql_mismatch: Vec<String>,
}

impl Bench {
    /// Fills `"1".."10000"` with the library (eight threads).
    pub(crate) fn prefill(&mut self) -> Result<(), BoxError> {
        let tombstones = quote_identifier(&format!("{TABLE}_tombstones"));
        self.admin
            .batch_execute(&format!("TRUNCATE {}, {tombstones}", self.table_sql))?;
        let (store, state) = (&self.store, &self.state);
        std::thread::scope(|scope| -> Result<(), String> {
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    scope.spawn(move || -> Result<(), String> {
                        for id in (1 + t..=ACTORS).step_by(8) {
                            store
                                .raw()
                                .save(&id.to_string(), state)
                                .map_err(|e| format!("prefill: {e}"))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("prefill thread panicked"))
        })?;
        self.admin
            .batch_execute(&format!("VACUUM ANALYZE {}", self.table_sql))?;
        Ok(())
    }

    /// Inserts fresh ids for every delete run, in one statement (the trigger
    /// is skipped where allowed: it would only announce the inserts), and
    /// returns each run's `(first id, ids per thread)` in run order.
    pub(crate) fn provision_deletes(&mut self) -> Result<Vec<(u64, u64)>, BoxError> {
        let opts = &self.opts;
        let lib_block = (opts.duration.as_secs_f64() * opts.delete_rate).ceil() as u64;
        let pg_block = (opts.pgbench_seconds() as f64 * opts.delete_rate).ceil() as u64;
        let first = self.next_delete_id;
        let mut blocks = Vec::new();
        for &threads in &opts.threads {
            for _ in 0..opts.rounds {
                for block in [lib_block, pg_block] {
                    let per = block.div_ceil(threads as u64).max(1);
                    blocks.push((self.next_delete_id, per));
                    self.next_delete_id += per * threads as u64;
                }
            }
        }
        if self.next_delete_id - 1 > DELETE_LIMIT {
            return Err("too many ids to delete: lower BENCH_DELETE_RATE or the duration".into());
        }
        let started = Instant::now();
        let replica = self
            .admin
            .batch_execute("SET session_replication_role = replica")
            .is_ok();
        self.admin.execute(
            &format!(
                "INSERT INTO {} (actor_id, state, sequence_number) \
                 SELECT g::text, $1, 1 FROM generate_series($2::bigint, $3::bigint) g",
                self.table_sql
            ),
            &[
                &self.state,
                &(first as i64),
                &(self.next_delete_id as i64 - 1),
            ],
        )?;
        if replica {
            self.admin.batch_execute("RESET session_replication_role")?;
        }
        self.admin
            .batch_execute(&format!("VACUUM ANALYZE {}", self.table_sql))?;
        eprintln!(
            "delete: {} ids provisioned in {:.1} s{}",
            thousands((self.next_delete_id - first) as f64),
            started.elapsed().as_secs_f64(),
            if replica { "" } else { " (with the trigger)" }
        );
        Ok(blocks)
    }

    /// Checks the text the store's connections ran last against ours.
    pub(crate) fn check_statement_text(&mut self, op: Op) -> Result<(), BoxError> {
        let ran: Vec<String> = self
            .admin
            .query(
                "SELECT query FROM pg_stat_activity WHERE application_name = $1 AND query <> ''",
                &[&self.app_name],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // The server keeps `track_activity_query_size` bytes of each query
        // (1 kB by default; the throwaway cluster keeps 16 kB): a long
        // statement may be seen cut short.
        let same =
            |seen: &str, copy: &str| seen == copy || (seen.len() >= 1000 && copy.starts_with(seen));
        let known = self.sql.all();
        // Not statements of `Statements`: a connection's set-up query (its
        // server process and settings), the last text of a connection that
        // ran nothing else, and transaction control, the last text of one
        // whose last write ran in a transaction.
        let bookkeeping = |text: &str| {
            text.starts_with("SELECT pg_backend_pid()") || matches!(text, "BEGIN" | "COMMIT")
        };
        for text in &ran {
            if !known.iter().any(|k| same(text, k))
                && !bookkeeping(text)
                && !self.sql_mismatch.contains(text)
            {
                self.sql_mismatch.push(text.clone());
            }
        }
        if ran.iter().any(|t| same(t, self.sql.main_statement(op))) && !self.verified.contains(&op)
        {
            self.verified.push(op);
        }
        Ok(())
    }

    pub(crate) fn library_round(
        &mut self,
        row: &mut Row,
        round: usize,
        block: Option<(u64, u64)>,
    ) -> Result<(), BoxError> {
        let (op, threads) = (row.op, row.threads);
        checkpoint(&mut self.admin);
        let store = if op == Op::SaveGrouped {
            &self.grouped
        } else {
            &self.store
        };
        let lib = if matches!(op, Op::LoadDriver | Op::LoadWire) {
            run_bare(op, &self.url, &self.sql.load, threads, self.opts.duration)
        } else {
            run_library(store, op, threads, self.opts.duration, &self.state, block)
        };
        // Grouped saves run the bulk statement, which has no pgbench twin;
        // the bare driver is not the library.
        if op.library_statement() {
            self.check_statement_text(op)?;
        }
        if let Some((base, per)) = block {
            let count = per * threads as u64;
            let gone = count - remaining(&mut self.admin, &self.table_sql, base, count)?;
            if gone != lib.ops - lib.misses {
                row.notes.push(format!(
                    "lib round {round}: {gone} rows gone for {} deletes",
                    lib.ops - lib.misses
                ));
            }
        }
        if lib.exhausted {
            row.notes.push(format!(
                "lib round {round} EXHAUSTED its ids (raise BENCH_DELETE_RATE)"
            ));
        }
        if lib.misses > 0 {
            row.notes
                .push(format!("lib round {round}: {} misses", lib.misses));
        }
        if let (Some(e), true) = (&lib.first_error, lib.errors > 0 || lib.ops == 0) {
            row.notes.push(format!("lib round {round}: {e}"));
        }
        eprintln!(
            "{:<19} T={threads:<2} round {round} library: {:>9} ops/s  p50 {:.0} µs  p99 {:.0} µs  max {:.0} µs  CPU {:.1} µs/op",
            op.name(),
            thousands(lib.ops_per_sec()),
            lib.p50_us,
            lib.p99_us,
            lib.max_us,
            lib.cpu_secs * 1e6 / lib.ops.max(1) as f64
        );
        row.lib.push(lib);
        Ok(())
    }

    pub(crate) fn pgbench_round(
        &mut self,
        row: &mut Row,
        round: usize,
        block: Option<(u64, u64)>,
    ) -> Result<(), BoxError> {
        let Some(pgbench) = &self.pgbench else {
            return Ok(());
        };
        let (op, threads) = (row.op, row.threads);
        let script = pgbench_script(op, &self.sql, &self.bytea_literal, threads);
        let mut defines: Vec<(&str, String)> = Vec::new();
        if let Some((base, per)) = block {
            defines.push(("base", base.to_string()));
            defines.push(("per", per.to_string()));
            defines.push(("n", "0".to_owned()));
        }
        let contended_sequence = |admin: &mut postgres::Client| -> Result<i64, BoxError> {
            Ok(admin
                .query_opt(&self.sql.sequence, &[&CONTENDED_ID])?
                .map_or(0, |r| r.get(0)))
        };
        let before = contended_sequence(&mut self.admin)?;
        checkpoint(&mut self.admin);
        let name = format!("{}_{threads}_{round}", op.name());
        let mut result = pgbench.run(
            &name,
            &script,
            threads,
            self.opts.pgbench_seconds(),
            &defines,
        );
        match &mut result {
            Ok(run) => {
                if run.failed > 0 {
                    row.notes
                        .push(format!("pgbench round {round}: {} failed", run.failed));
                }
                if op == Op::TransformContended {
                    // Count successful writes only, like the library.
                    let written = (contended_sequence(&mut self.admin)? - before).max(0) as u64;
                    let attempts = run.processed.max(1);
                    row.pg_conflicts += attempts.saturating_sub(written);
                    row.pg_attempts += attempts;
                    run.tps *= written as f64 / attempts as f64;
                }
                if let Some((base, per)) = block {
                    let count = per * threads as u64;
                    let gone = count - remaining(&mut self.admin, &self.table_sql, base, count)?;
                    if gone < run.processed {
                        row.notes.push(format!(
                            "pgbench round {round} EXHAUSTED: {} deletes, {gone} rows gone \
                             (raise BENCH_DELETE_RATE)",
                            run.processed
                        ));
                    }
                }
                eprintln!(
                    "{:<19} T={threads:<2} round {round} pgbench: {:>9} tps    latency avg {:.0} µs  CPU {:.1} µs/tx",
                    op.name(),
                    thousands(run.tps),
                    run.latency_avg_ms * 1_000.0,
                    run.cpu_secs * 1e6 / run.processed.max(1) as f64
                );
            }
            Err(e) => {
                eprintln!("{} T={threads} round {round} pgbench: {e}", op.name());
                row.notes.push(format!("pgbench round {round} failed"));
            }
        }
        row.pg.push(result);
        Ok(())
    }

    pub(crate) fn run_all(&mut self) -> Result<Vec<Row>, BoxError> {
        let mut rows = Vec::new();
        for op in self.opts.ops.clone() {
            let mut blocks = if op == Op::Delete {
                self.provision_deletes()?
            } else {
                Vec::new()
            }
            .into_iter();
            for threads in self.opts.threads.clone() {
                let mut row = Row {
                    op,
                    threads,
                    lib: Vec::new(),
                    pg: Vec::new(),
                    notes: Vec::new(),
                    pg_conflicts: 0,
                    pg_attempts: 0,
                };
                for round in 1..=self.opts.rounds {
                    self.library_round(&mut row, round, blocks.next())?;
                    self.pgbench_round(&mut row, round, blocks.next())?;
                }
                if matches!(op, Op::Transform | Op::TransformContended) {
                    let retries: u64 = row.lib.iter().map(|r| r.retries).sum();
                    let ops: u64 = row.lib.iter().map(|r| r.ops).sum();
                    row.notes.push(format!(
                        "lib retries {retries} ({:.2}/op)",
                        retries as f64 / ops.max(1) as f64
                    ));
                }
                if row.pg_attempts > 0 {
                    row.notes.push(format!(
                        "pgbench: {} of {} attempts lost the race; tps = writes/s",
                        row.pg_conflicts, row.pg_attempts
                    ));
                }
                let errors: u64 = row.lib.iter().map(|r| r.errors).sum();
                if errors > 0 {
                    row.notes.push(format!("lib errors {errors}"));
                }
                rows.push(row);
            }
        }
        Ok(rows)
    }
}
