//! One actor at a time: `get`, `put`, `delete`, `seq`, and `ls`.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde_json::Value;
use trebuchet_postgres::{validate_actor_id, Expected, WriteOptions};

use crate::args::{Delete, Get, Ls, PurgeTombstones, Put, Seq, Sweep};
use crate::fail::Failure;
use crate::output::{escape, json_line, prompt_if_terminal, timestamp};
use crate::settings::Settings;
use crate::state_json;

pub fn get(settings: &Settings, args: &Get) -> Result<(), Failure> {
    validate_actor_id(&args.id)?;
    let connected = settings.store()?;
    let store = &connected.store;
    let found = store
        .raw()
        .load_versioned(&args.id)
        .map_err(|e| connected.fail(e))?
        .ok_or_else(|| Failure::not_found(&args.id))?;
    let mut out = io::stdout().lock();
    if args.raw {
        out.write_all(&found.value)?;
        out.flush()?;
        return Ok(());
    }
    let state = state_json::decode(store.codec(), &found.value).map_err(|e| {
        Failure::error(format!(
            "could not decode the state of actor {:?} as {}: {e}; try --codec {}, or --raw \
             for the bytes as stored",
            args.id,
            codec_name(store.codec()),
            codec_name(other_codec(store.codec())),
        ))
    })?;
    let written = match (args.meta, args.compact) {
        (true, compact) => {
            let value = WithMeta {
                actor_id: &args.id,
                sequence: found.sequence,
                updated_at: timestamp(found.updated_at),
                created_at: timestamp(found.created_at),
                state,
            };
            if compact {
                serde_json::to_writer(&mut out, &value)
            } else {
                serde_json::to_writer_pretty(&mut out, &value)
            }
        }
        (false, true) => serde_json::to_writer(&mut out, &state),
        (false, false) => serde_json::to_writer_pretty(&mut out, &state),
    };
    written.map_err(|e| Failure::from(std::io::Error::from(e)))?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// `get --meta`.
#[derive(Serialize)]
struct WithMeta<'a> {
    actor_id: &'a str,
    sequence: u64,
    updated_at: String,
    created_at: String,
    state: Value,
}

/// `ls --json`.
#[derive(Serialize)]
struct Listed<'a> {
    actor_id: &'a str,
    sequence: u64,
    size: u64,
    updated_at: String,
}

pub fn put(settings: &Settings, args: &Put) -> Result<(), Failure> {
    validate_actor_id(&args.id)?;
    let input = match args.value.as_deref() {
        Some(value) if value != "-" => value.as_bytes().to_vec(),
        _ => {
            prompt_if_terminal("the state");
            read_state(io::stdin().lock(), settings.max_state_size)?
        }
    };
    let bytes = if args.raw {
        input
    } else {
        let value: Value = serde_json::from_slice(&input).map_err(|e| {
            Failure::usage(format!(
                "the state is not JSON: {e}; pass --raw to store bytes as they are"
            ))
        })?;
        state_json::encode(settings.codec, &value)
            .map_err(|e| Failure::usage(format!("cannot encode the state: {e}")))?
    };
    let connected = settings.store()?;
    let store = &connected.store;
    let mut options = WriteOptions::new();
    match (args.if_sequence, args.if_absent) {
        (Some(n), _) => options = options.expect(Expected::Sequence(n)),
        (None, true) => options = options.expect(Expected::Absent),
        (None, false) => {}
    }
    if let Some(ttl) = args.ttl {
        options = options.ttl(ttl);
    }
    let sequence = store
        .raw()
        .save_with(&args.id, &bytes, options)
        .map_err(|e| connected.fail(e))?;
    let mut out = io::stdout().lock();
    writeln!(out, "{sequence}")?;
    Ok(())
}

/// Reads a state of at most `max` bytes from `input`. Reads one byte more
/// at most, so endless input is refused as soon as it is too long. JSON
/// text counts as it is given: a state is rarely much shorter encoded.
fn read_state(input: impl Read, max: usize) -> Result<Vec<u8>, Failure> {
    let limit = u64::try_from(max).map_or(u64::MAX, |max| max.saturating_add(1));
    let mut buffer = Vec::new();
    input
        .take(limit)
        .read_to_end(&mut buffer)
        .map_err(|e| Failure::error(format!("cannot read standard input: {e}")))?;
    if buffer.len() > max {
        return Err(Failure::usage(format!(
            "the state on standard input is over the store's maximum of {max} bytes; \
             stopped reading there"
        )));
    }
    Ok(buffer)
}

pub fn delete(settings: &Settings, args: &Delete) -> Result<(), Failure> {
    validate_actor_id(&args.id)?;
    let connected = settings.store()?;
    let existed = connected
        .store
        .delete(&args.id)
        .map_err(|e| connected.fail(e))?;
    if !existed && !args.missing_ok {
        return Err(Failure::not_found(&args.id));
    }
    if existed {
        eprintln!("deleted actor {:?}", args.id);
    }
    Ok(())
}

pub fn purge_tombstones(settings: &Settings, args: &PurgeTombstones) -> Result<(), Failure> {
    let connected = settings.store()?;
    let store = &connected.store;
    let purged = store
        .purge_tombstones(args.older_than)
        .map_err(|e| connected.fail(e))?;
    writeln!(
        io::stdout().lock(),
        "purged {purged} {} from {}",
        if purged == 1 {
            "tombstone"
        } else {
            "tombstones"
        },
        store.table()
    )?;
    Ok(())
}

pub fn sweep(settings: &Settings, args: &Sweep) -> Result<(), Failure> {
    let connected = settings.store()?;
    let store = &connected.store;
    let sweep = store
        .sweep_expired(args.batch)
        .map_err(|e| connected.fail(e))?;
    let table = store.table();
    let mut out = io::stdout().lock();
    if sweep.busy && sweep.batches == 0 {
        writeln!(
            out,
            "another sweeper is working on {table}: nothing removed by this one"
        )?;
    } else {
        writeln!(
            out,
            "removed {} expired {} from {table} in {} {}{}",
            sweep.removed,
            if sweep.removed == 1 {
                "actor"
            } else {
                "actors"
            },
            sweep.batches,
            if sweep.batches == 1 {
                "batch"
            } else {
                "batches"
            },
            if sweep.busy {
                "; another sweeper took over"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

pub fn seq(settings: &Settings, args: &Seq) -> Result<(), Failure> {
    validate_actor_id(&args.id)?;
    let connected = settings.store()?;
    let sequence = connected
        .store
        .sequence(&args.id)
        .map_err(|e| connected.fail(e))?
        .ok_or_else(|| Failure::not_found(&args.id))?;
    writeln!(io::stdout().lock(), "{sequence}")?;
    Ok(())
}

pub fn ls(settings: &Settings, args: &Ls) -> Result<(), Failure> {
    let connected = settings.store()?;
    let store = &connected.store;
    let mut out = io::BufWriter::new(io::stdout().lock());
    if args.long {
        writeln!(
            out,
            "{:>10}  {:>10}  {:<27}  ACTOR",
            "SEQUENCE", "SIZE", "UPDATED"
        )?;
    }
    let mut after = args.after.clone();
    let mut printed: u64 = 0;
    loop {
        let room = args.limit.map_or(u64::MAX, |limit| limit - printed);
        if room == 0 {
            break;
        }
        let page_size =
            u32::try_from(room.min(u64::from(args.page_size))).unwrap_or(args.page_size);
        let page = store
            .list_actors(&args.prefix, after.as_deref(), page_size)
            .map_err(|e| connected.fail(e))?;
        for actor in &page.actors {
            if args.json {
                json_line(
                    &mut out,
                    &Listed {
                        actor_id: &actor.actor_id,
                        sequence: actor.sequence,
                        size: actor.size,
                        updated_at: timestamp(actor.updated_at),
                    },
                )?;
            } else if args.long {
                writeln!(
                    out,
                    "{:>10}  {:>10}  {:<27}  {}",
                    actor.sequence,
                    actor.size,
                    timestamp(actor.updated_at),
                    escape(&actor.actor_id)
                )?;
            } else {
                writeln!(out, "{}", escape(&actor.actor_id))?;
            }
        }
        printed += page.actors.len() as u64;
        match page.next {
            Some(next) => after = Some(next),
            None => {
                after = None;
                break;
            }
        }
    }
    out.flush()?;
    if let Some(after) = after {
        eprintln!("more actors follow: continue with --after {after:?}");
    }
    Ok(())
}

fn codec_name(codec: trebuchet_postgres::Codec) -> &'static str {
    match codec {
        trebuchet_postgres::Codec::Json => "json",
        _ => "cbor",
    }
}

fn other_codec(codec: trebuchet_postgres::Codec) -> trebuchet_postgres::Codec {
    match codec {
        trebuchet_postgres::Codec::Json => trebuchet_postgres::Codec::Cbor,
        _ => trebuchet_postgres::Codec::Json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input that never ends, counting what was read from it.
    struct Endless {
        read: usize,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            buf.fill(b'x');
            self.read += buf.len();
            Ok(buf.len())
        }
    }

    #[test]
    fn a_state_is_read_up_to_the_maximum_and_no_further() {
        assert_eq!(read_state(&b"12345"[..], 5).unwrap(), b"12345");
        assert_eq!(read_state(&b""[..], 5).unwrap(), b"");
        let failure = read_state(&b"123456"[..], 5).unwrap_err();
        assert_eq!(failure.code, crate::fail::USAGE);
        assert!(
            failure
                .to_string()
                .contains("over the store's maximum of 5 bytes"),
            "{failure}"
        );
        let mut endless = Endless { read: 0 };
        assert!(read_state(&mut endless, 1000).is_err());
        assert_eq!(endless.read, 1001);
    }
}
