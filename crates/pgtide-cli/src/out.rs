//! The one writer for command output. Every `print!`/`println!` of the CLI comes here (main.rs
//! shadows both macros), so a reader that goes away early (`pgtide stream list | head -1`) ends
//! the command quietly with exit 0 instead of the std macros' panic (exit 101).

use std::fmt;
use std::io::{ErrorKind, Write};

use crate::error;

/// Writes `args` (and a newline when `newline`) to stdout. A closed pipe ends the process with
/// exit 0: whoever closed it has all the output it wanted. Any other write error ends it with
/// exit 1 and one line on stderr.
pub fn write(args: fmt::Arguments<'_>, newline: bool) {
    let mut out = std::io::stdout().lock();
    let result = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        // Flush now: a closed pipe must be seen here, not by the panicking flush at exit.
        .and_then(|()| out.flush());
    if let Err(e) = result {
        if e.kind() == ErrorKind::BrokenPipe {
            std::process::exit(i32::from(error::OK));
        }
        // eprintln! is safe: a lost stderr panics nowhere we care about.
        eprintln!("pgtide: cannot write to stdout: {e}");
        std::process::exit(i32::from(error::RUNTIME));
    }
}
