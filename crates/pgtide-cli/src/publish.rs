//! `publish`: one message (`--data`, `--file`) or one per line (stdin, `--file --lines`).
//!
//! Line input is streamed with constant memory: a reader thread parses and checks lines into
//! batches of `--batch-size` (at most two batches wait in the channel), and each batch is
//! published atomically. A bad line (malformed JSON, payload over the stream's limit) stops the
//! run before its batch: the error names the line and says exactly which lines were published.
//! `--file --lines` checks the whole file before publishing anything. `--dry-run` prints each
//! message it would publish as a JSON line and publishes nothing.
//!
//! On Postgres, publishing to a stream without groups warns on stderr: no group will ever
//! receive those messages unless one is created with `--from oldest`.
//!
//! On Postgres an unknown stream fails before any input is read and batches commit whole. Other
//! backends check the stream and the payload sizes with the first batch (before sending it), and
//! a broker may keep part of a batch that fails half-way: the error then says which lines may be in.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pgtide::{Headers, OutgoingMessage};
use serde_json::json;
use tokio::sync::mpsc;

use crate::backend::Target;
use crate::cli::PublishArgs;
use crate::error::{CliError, CliResult};
use crate::human::{payload_json, plural};
use crate::telemetry;

/// How every message of this run is built.
#[derive(Clone)]
struct Template {
    raw: bool,
    headers: Headers,
    delay: Option<Duration>,
    /// The ordering key of every message (checked before any input is read).
    key: Option<String>,
    /// The stream's limit when known up front (Postgres); other backends check it on publish.
    max_payload: Option<usize>,
}

impl Template {
    fn message(&self, payload: Vec<u8>) -> Result<OutgoingMessage, String> {
        if let Some(max) = self.max_payload.filter(|max| payload.len() > *max) {
            return Err(format!(
                "payload of {} bytes exceeds the stream's max_payload of {max} bytes (raise it with `pgtide stream update STREAM --max-payload ...`)",
                payload.len(),
            ));
        }
        let mut msg = if self.raw {
            OutgoingMessage::bytes(payload)
        } else {
            let text = String::from_utf8(payload).map_err(|_| {
                "not valid UTF-8, so not JSON (use --raw for opaque payloads)".to_owned()
            })?;
            OutgoingMessage::json_text(text.trim().to_owned())
                .map_err(|e| format!("{e} (use --raw for payloads that are not JSON)"))?
        };
        msg = msg.headers(self.headers.clone());
        if let Some(d) = self.delay {
            msg = msg.delay(d);
        }
        if let Some(key) = &self.key {
            msg = msg.key(key.clone());
        }
        Ok(msg)
    }

    /// What `--dry-run` prints for one message instead of publishing it.
    fn dry_run_json(
        &self,
        stream: &str,
        msg: &OutgoingMessage,
        dedupe_key: Option<&str>,
    ) -> serde_json::Value {
        let (payload, encoding) = payload_json(msg.payload(), Some(!self.raw));
        json!({
            "stream": stream,
            "payload": payload,
            "payload_encoding": encoding,
            "headers": self.headers,
            "delay_secs": self.delay.map(|d| d.as_secs_f64()),
            "dedupe_key": dedupe_key,
            "key": self.key,
        })
    }
}

/// Warns on stderr when the stream has no group: nothing published now reaches a group created
/// later unless that group starts from the oldest message.
async fn warn_without_groups<B: Target>(b: &B, stream: &str) -> CliResult {
    if let Some(pg) = b.postgres() {
        if pg.groups(Some(stream)).await?.is_empty() {
            eprintln!(
                "warning: stream {stream:?} has no groups, so no one receives these messages; a group created later gets them only with `pgtide group create {stream} GROUP --from oldest`"
            );
        }
    }
    Ok(())
}

fn parse_headers(pairs: &[String]) -> CliResult<Headers> {
    let mut headers = Headers::new();
    for pair in pairs {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                headers.insert(k.to_owned(), v.to_owned());
            }
            _ => {
                return Err(CliError::usage(format!(
                    "--header {pair:?} is invalid: use key=value"
                )))
            }
        }
    }
    Ok(headers)
}

/// `publish STREAM`.
pub async fn run<B: Target>(b: &B, args: PublishArgs) -> CliResult {
    pgtide::validate_name("stream", &args.stream)?;
    let headers = parse_headers(&args.headers)?;
    if let Some(key) = &args.key {
        pgtide::validate_key(key).map_err(|e| CliError::usage(format!("--key: {e}")))?;
    }
    let max_payload = match b.postgres() {
        // An unknown stream fails before any input is read.
        Some(pg) => Some(
            pg.stream(&args.stream)
                .await?
                .ok_or_else(|| CliError::from(pgtide::Error::StreamNotFound(args.stream.clone())))?
                .config
                .max_payload,
        ),
        None => None,
    };
    warn_without_groups(b, &args.stream).await?;
    let template = Template {
        raw: args.raw,
        headers,
        delay: args.delay,
        key: args.key.clone(),
        max_payload,
    };
    let single =
        match (&args.data, &args.file) {
            (Some(data), _) => Some(data.clone().into_bytes()),
            (None, Some(path)) if !args.lines => Some(std::fs::read(path).map_err(|e| {
                CliError::usage(format!("cannot read --file {}: {e}", path.display()))
            })?),
            _ => None,
        };
    if let Some(payload) = single {
        let mut msg = template
            .message(payload)
            .map_err(|e| CliError::usage(format!("message: {e}")))?;
        if let Some(key) = &args.dedupe_key {
            msg = msg.dedupe_key(key.clone());
        }
        if args.dry_run {
            if !args.quiet {
                let line = template.dry_run_json(&args.stream, &msg, args.dedupe_key.as_deref());
                println!("{line}");
            }
            eprintln!(
                "ok: 1 message would be published to stream {:?}",
                args.stream
            );
            return Ok(());
        }
        let receipt = b.publish(&args.stream, msg).await?;
        if receipt.duplicate {
            eprintln!(
                "duplicate: dedupe key {:?} matched message {} inside the stream's dedupe window; nothing new was published",
                args.dedupe_key.as_deref().unwrap_or_default(),
                receipt.id
            );
        } else {
            telemetry::published(b, &args.stream, 1);
        }
        if !args.quiet {
            println!("{}", receipt.id);
        }
        return Ok(());
    }
    if args.dedupe_key.is_some() {
        return Err(CliError::usage(
            "--dedupe-key applies to one message: use it with --data or --file (without --lines)",
        ));
    }
    let run = LineRun {
        backend: b,
        args: &args,
        template: &template,
        token: crate::shutdown_signal(),
    };
    match &args.file {
        Some(path) => {
            if args.dry_run {
                run.lines(open(path)?, true, false).await?;
            } else {
                // Check every line first: a bad file publishes nothing.
                run.lines(open(path)?, true, true).await?;
                run.lines(open(path)?, false, false).await?;
            }
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("reading messages from the terminal, one per line; end with Ctrl-D");
            }
            run.lines(
                Box::new(BufReader::with_capacity(1 << 16, stdin)),
                args.dry_run,
                false,
            )
            .await?;
        }
    }
    Ok(())
}

fn open(path: &Path) -> CliResult<Box<dyn BufRead + Send>> {
    let file = std::fs::File::open(path)
        .map_err(|e| CliError::usage(format!("cannot read --file {}: {e}", path.display())))?;
    Ok(Box::new(BufReader::with_capacity(1 << 16, file)))
}

enum Chunk {
    Batch {
        first_line: u64,
        last_line: u64,
        msgs: Vec<OutgoingMessage>,
    },
    Bad {
        line: u64,
        error: String,
    },
}

/// Reads lines into checked batches on a thread of its own (stdin reads block).
fn spawn_reader(
    mut reader: Box<dyn BufRead + Send>,
    template: Template,
    batch: usize,
    tx: mpsc::Sender<Chunk>,
) {
    std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(1024);
        let mut line = 0u64;
        let mut msgs = Vec::with_capacity(batch);
        let mut first_line = 1u64;
        loop {
            buf.clear();
            let n = match reader.read_until(b'\n', &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx.blocking_send(Chunk::Bad {
                        line: line + 1,
                        error: format!("cannot read input: {e}"),
                    });
                    return;
                }
            };
            if n == 0 {
                break;
            }
            line += 1;
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            let blank = if template.raw {
                buf.is_empty()
            } else {
                buf.iter().all(u8::is_ascii_whitespace)
            };
            if blank {
                continue;
            }
            match template.message(std::mem::take(&mut buf)) {
                Ok(m) => msgs.push(m),
                Err(error) => {
                    let _ = tx.blocking_send(Chunk::Bad { line, error });
                    return;
                }
            }
            if msgs.len() == batch {
                let chunk = Chunk::Batch {
                    first_line,
                    last_line: line,
                    msgs: std::mem::replace(&mut msgs, Vec::with_capacity(batch)),
                };
                first_line = line + 1;
                if tx.blocking_send(chunk).is_err() {
                    return;
                }
            }
        }
        if !msgs.is_empty() {
            let _ = tx.blocking_send(Chunk::Batch {
                first_line,
                last_line: line,
                msgs,
            });
        }
    });
}

fn progress_bar(enabled: bool) -> Option<ProgressBar> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {human_pos} messages published{msg} ({elapsed})")
    {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(120));
    Some(pb)
}

/// A failed batch of `lines`: the error, and which lines are in, may be in, or are not.
fn batch_failed<B: Target>(
    b: &B,
    e: pgtide::Error,
    (first_line, last_line): (u64, u64),
    done_through: u64,
    published: u64,
) -> CliError {
    // Errors found before sending (unknown stream, bad input) publish nothing on every backend;
    // a broker failing half-way may keep part of the batch.
    let whole = b.postgres().is_some()
        || b.kind() == "memory"
        || matches!(
            e,
            pgtide::Error::StreamNotFound(_)
                | pgtide::Error::PayloadTooLarge { .. }
                | pgtide::Error::InvalidName { .. }
                | pgtide::Error::Unsupported { .. }
        );
    let e = CliError::from(e);
    let partly = format!(
        "lines {first_line}-{last_line} may be partly published (the {} backend does not publish a batch atomically), nothing after line {last_line}",
        b.kind()
    );
    let done = match (published, whole) {
        (0, true) => "nothing was published".to_owned(),
        (0, false) => partly,
        (_, true) => format!(
            "lines 1-{done_through} ({}) were published, nothing from line {first_line} on",
            plural(published, "message", "messages")
        ),
        (_, false) => {
            format!(
                "lines 1-{done_through} ({}) were published, {partly}",
                plural(published, "message", "messages")
            )
        }
    };
    CliError::new(
        e.code,
        format!("lines {first_line}-{last_line}: {e}; {done}"),
    )
}

/// One line-mode publish.
struct LineRun<'a, B> {
    backend: &'a B,
    args: &'a PublishArgs,
    template: &'a Template,
    token: pgtide::CancellationToken,
}

impl<B: Target> LineRun<'_, B> {
    /// Publishes (or with `dry_run`, checks) one message per line of `reader`. Unless `silent`,
    /// a dry run prints each message and the count.
    async fn lines(
        &self,
        reader: Box<dyn BufRead + Send>,
        dry_run: bool,
        silent: bool,
    ) -> CliResult {
        let (b, args, token) = (self.backend, self.args, &self.token);
        let (tx, mut rx) = mpsc::channel(1);
        spawn_reader(reader, self.template.clone(), args.batch_size as usize, tx);
        let bar = progress_bar(!dry_run);
        let mut out = std::io::BufWriter::new(std::io::stdout());
        let mut published = 0u64;
        let mut done_through = 0u64;
        let result = loop {
            if token.is_cancelled() {
                let what = format!(
                    "interrupted: lines 1-{done_through} ({}) were published, nothing after",
                    plural(published, "message", "messages")
                );
                break Err(CliError::new(crate::error::INTERRUPTED, what));
            }
            let chunk = tokio::select! {
                biased;
                _ = token.cancelled() => continue,
                c = rx.recv() => c,
            };
            match chunk {
                None => break Ok(()),
                Some(Chunk::Bad { line, error }) => {
                    let done = if dry_run || published == 0 {
                        "nothing was published".to_owned()
                    } else {
                        format!(
                            "lines 1-{done_through} ({}) were published, nothing from line {} on",
                            plural(published, "message", "messages"),
                            done_through + 1
                        )
                    };
                    break Err(CliError::usage(format!("line {line}: {error}; {done}")));
                }
                Some(Chunk::Batch {
                    first_line,
                    last_line,
                    msgs,
                }) => {
                    if dry_run {
                        published += msgs.len() as u64;
                        done_through = last_line;
                        if !silent && !args.quiet {
                            let written = msgs
                                .iter()
                                .try_for_each(|m| {
                                    let line = self.template.dry_run_json(&args.stream, m, None);
                                    writeln!(out, "{line}")
                                })
                                .and_then(|()| out.flush());
                            if let Err(e) = written {
                                break Err(CliError::runtime(format!(
                                    "cannot write to stdout ({e}); nothing was published"
                                )));
                            }
                        }
                        continue;
                    }
                    // Never cancelled half-way: a batch is sent whole (on Postgres: committed or not).
                    let receipts = match b.publish_batch(&args.stream, &msgs).await {
                        Ok(r) => r,
                        Err(e) => {
                            break Err(batch_failed(
                                b,
                                e,
                                (first_line, last_line),
                                done_through,
                                published,
                            ))
                        }
                    };
                    published += receipts.len() as u64;
                    done_through = last_line;
                    telemetry::published(b, &args.stream, receipts.len() as u64);
                    if let Some(pb) = &bar {
                        pb.inc(receipts.len() as u64);
                        let secs = pb.elapsed().as_secs_f64().max(1e-3);
                        pb.set_message(format!(", {:.0}/s", pb.position() as f64 / secs));
                    }
                    if !args.quiet {
                        let written = receipts
                            .iter()
                            .try_for_each(|r| writeln!(out, "{}", r.id))
                            .and_then(|()| out.flush());
                        if let Err(e) = written {
                            break Err(CliError::runtime(format!(
                            "cannot write ids to stdout ({e}); lines 1-{done_through} ({}) were published",
                            plural(published, "message", "messages")
                        )));
                        }
                    }
                }
            }
        };
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        result?;
        if !silent {
            if dry_run {
                eprintln!(
                    "ok: {} would be published to stream {:?}",
                    plural(published, "message", "messages"),
                    args.stream
                );
            } else if std::io::stderr().is_terminal() {
                eprintln!(
                    "published {} to stream {:?}",
                    plural(published, "message", "messages"),
                    args.stream
                );
            }
        }
        Ok(())
    }
}
