//! `publish`: one message (`--data`, `--file`) or one per line (stdin, `--file --lines`).
//!
//! Line input is streamed with constant memory: a reader thread parses and checks lines into
//! batches of `--batch-size` (at most two batches wait in the channel), and each batch is
//! published atomically. A bad line (malformed JSON, payload over the stream's limit) stops the
//! run before its batch: the error names the line and says exactly which lines were published.
//! `--file --lines` checks the whole file before publishing anything.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use pgtide::{Headers, OutgoingMessage, PgBackend};
use tokio::sync::mpsc;

use crate::cli::PublishArgs;
use crate::error::{CliError, CliResult};
use crate::telemetry;

/// How every message of this run is built.
#[derive(Clone)]
struct Template {
    raw: bool,
    headers: Headers,
    delay: Option<Duration>,
    max_payload: usize,
}

impl Template {
    fn message(&self, payload: Vec<u8>) -> Result<OutgoingMessage, String> {
        if payload.len() > self.max_payload {
            return Err(format!(
                "payload of {} bytes exceeds the stream's max_payload of {} bytes (raise it with `pgtide stream update STREAM --max-payload ...`)",
                payload.len(),
                self.max_payload
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
        Ok(msg)
    }
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
pub async fn run(pg: &PgBackend, args: PublishArgs) -> CliResult {
    pgtide::validate_name("stream", &args.stream)?;
    let headers = parse_headers(&args.headers)?;
    // An unknown stream fails before any input is read.
    let info = pg
        .stream(&args.stream)
        .await?
        .ok_or_else(|| CliError::from(pgtide::Error::StreamNotFound(args.stream.clone())))?;
    let template = Template {
        raw: args.raw,
        headers,
        delay: args.delay,
        max_payload: info.config.max_payload,
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
            eprintln!(
                "ok: 1 message would be published to stream {:?}",
                args.stream
            );
            return Ok(());
        }
        let receipt = pg.publish(&args.stream, msg).await?;
        if receipt.duplicate {
            eprintln!(
                "duplicate: dedupe key {:?} matched message {} inside the stream's dedupe window; nothing new was published",
                args.dedupe_key.as_deref().unwrap_or_default(),
                receipt.id
            );
        } else {
            telemetry::published(&args.stream, 1);
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
        pg,
        args: &args,
        template: &template,
        token: crate::shutdown_signal(),
    };
    match &args.file {
        Some(path) => {
            // Check every line first: a bad file publishes nothing.
            run.lines(open(path)?, true, true).await?;
            if !args.dry_run {
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

/// One line-mode publish.
struct LineRun<'a> {
    pg: &'a PgBackend,
    args: &'a PublishArgs,
    template: &'a Template,
    token: pgtide::CancellationToken,
}

impl LineRun<'_> {
    /// Publishes (or with `dry_run`, checks) one message per line of `reader`.
    async fn lines(
        &self,
        reader: Box<dyn BufRead + Send>,
        dry_run: bool,
        silent: bool,
    ) -> CliResult {
        let (pg, args, token) = (self.pg, self.args, &self.token);
        let (tx, mut rx) = mpsc::channel(1);
        spawn_reader(reader, self.template.clone(), args.batch_size as usize, tx);
        let bar = progress_bar(!dry_run);
        let mut out = std::io::BufWriter::new(std::io::stdout());
        let mut published = 0u64;
        let mut done_through = 0u64;
        let result = loop {
            if token.is_cancelled() {
                let what = format!(
                    "interrupted: lines 1-{done_through} ({published} messages) were published, nothing after"
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
                            "lines 1-{done_through} ({published} messages) were published, nothing from line {} on",
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
                        continue;
                    }
                    // Never cancelled half-way: a batch commits or fails as a whole.
                    let receipts = match pg.publish_batch(&args.stream, &msgs).await {
                        Ok(r) => r,
                        Err(e) => {
                            let e = CliError::from(e);
                            break Err(CliError::new(
                            e.code,
                            format!(
                                "lines {first_line}-{last_line}: {e}; lines 1-{done_through} ({published} messages) were published, nothing from line {first_line} on"
                            ),
                        ));
                        }
                    };
                    published += receipts.len() as u64;
                    done_through = last_line;
                    telemetry::published(&args.stream, receipts.len() as u64);
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
                            "cannot write ids to stdout ({e}); lines 1-{done_through} ({published} messages) were published"
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
                    "ok: {published} messages would be published to stream {:?}",
                    args.stream
                );
            } else if std::io::stderr().is_terminal() {
                eprintln!("published {published} messages to stream {:?}", args.stream);
            }
        }
        Ok(())
    }
}
