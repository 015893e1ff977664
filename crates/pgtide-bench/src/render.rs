//! How a [`BenchReport`] prints: the machine, the cases with their ratios and targets, the
//! latency tables, the backends comparison (with ratios to Postgres), then the notes.

use std::fmt;

use super::BenchReport;

impl BenchReport {
    fn cases_table(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .cases
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.unit.format(c.value),
                    c.baseline.map(|b| c.unit.format(b)).unwrap_or_default(),
                    c.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                    c.target.map(|t| t.describe(c.unit)).unwrap_or_default(),
                    c.ok.map(|ok| if ok { "yes" } else { "NO" }.to_owned())
                        .unwrap_or_default(),
                ]
            })
            .collect();
        table(
            f,
            &["case", "value", "baseline", "ratio", "target", "ok?"],
            &[false, true, true, true, false, false],
            &rows,
        )
    }

    fn latency_tables(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |v: f64| format!("{v:.3}");
        let rows: Vec<Vec<String>> = self
            .latencies
            .iter()
            .map(|l| {
                vec![
                    l.name.clone(),
                    l.backlog.to_string(),
                    ms(l.p50_ms),
                    ms(l.p99_ms),
                    ms(l.mean_ms),
                    ms(l.max_ms),
                    l.samples.to_string(),
                ]
            })
            .collect();
        table(
            f,
            &[
                "latency", "backlog", "p50 ms", "p99 ms", "mean ms", "max ms", "samples",
            ],
            &[false, true, true, true, true, true, true],
            &rows,
        )?;
        if self.wakeups.is_empty() {
            return Ok(());
        }
        writeln!(f)?;
        let rows: Vec<Vec<String>> = self
            .wakeups
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    format!("{:.0}", t.rate_per_s),
                    ms(t.p50_ms),
                    ms(t.p99_ms),
                    ms(t.mean_ms),
                    ms(t.max_ms),
                    t.samples.to_string(),
                ]
            })
            .collect();
        table(
            f,
            &[
                "wake-up", "msgs/s", "p50 ms", "p99 ms", "mean ms", "max ms", "samples",
            ],
            &[false, true, true, true, true, true, true],
            &rows,
        )
    }

    fn backends_table(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.backends.is_empty() {
            return writeln!(
                f,
                "backends: not measured (BenchConfig::backends is off; on by default in full runs)"
            );
        }
        let pg = self.backends.iter().find(|r| r.backend == "postgres");
        // "12345 (2.10x)": the figure and its ratio to Postgres in the same table.
        let rate = |v: Option<f64>, base: Option<f64>| match (v, base) {
            (Some(v), Some(b)) if b > 0.0 => format!("{v:.0} ({:.2}x)", v / b),
            (Some(v), _) => format!("{v:.0}"),
            (None, _) => String::new(),
        };
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        let rows: Vec<Vec<String>> = self
            .backends
            .iter()
            .map(|r| {
                vec![
                    r.backend.clone(),
                    rate(r.publish_per_s, pg.and_then(|p| p.publish_per_s)),
                    rate(
                        r.publish_batch_per_s,
                        pg.and_then(|p| p.publish_batch_per_s),
                    ),
                    rate(r.consume_per_s, pg.and_then(|p| p.consume_per_s)),
                    ms(r.latency_p50_ms),
                    ms(r.latency_p99_ms),
                    r.skipped
                        .as_ref()
                        .map(|s| format!("skipped: {s}"))
                        .unwrap_or_else(|| r.endpoint.clone()),
                ]
            })
            .collect();
        table(
            f,
            &[
                "backend (x postgres)",
                "publish 1/call",
                "publish 100/call",
                "consume 4 x B=100",
                "pub->fetch p50 ms",
                "p99 ms",
                "server",
            ],
            &[false, true, true, true, true, true, false],
            &rows,
        )
    }
}

impl BenchReport {
    fn interval_table(
        f: &mut fmt::Formatter<'_>,
        title: &str,
        rows: &[super::Interval],
    ) -> fmt::Result {
        let mib = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_default();
        let rows: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    format!("{:.0}", r.at_secs),
                    r.phase.clone(),
                    format!("{:.0}", r.published_per_s),
                    format!("{:.0}", r.acked_per_s),
                    r.nacked.to_string(),
                    r.errors.to_string(),
                    format!("{:.3}", r.claim_p50_ms),
                    format!("{:.3}", r.claim_p99_ms),
                    r.backlog.to_string(),
                    mib(r.table_mib),
                    mib(r.index_mib),
                ]
            })
            .collect();
        writeln!(f, "{title}")?;
        table(
            f,
            &[
                "t s",
                "phase",
                "published/s",
                "acked/s",
                "nacked",
                "errors",
                "claim p50 ms",
                "p99 ms",
                "backlog",
                "tables MiB",
                "indexes MiB",
            ],
            &[
                true, false, true, true, true, true, true, true, true, true, true,
            ],
            &rows,
        )
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "machine: {} CPUs (nproc), PostgreSQL {}, fsync={}, synchronous_commit={}, shared_buffers={}",
            m.cpus, m.server_version, m.fsync, m.synchronous_commit, m.shared_buffers
        )?;
        writeln!(
            f,
            "run: {}, {:.2} s per side of each comparison in {} alternating rounds after {:.2} s warm-up, \
             {}-byte JSON payloads, one group per stream, {:.0} s in all",
            if self.quick { "quick" } else { "full" },
            self.phase_secs,
            self.rounds,
            self.warmup_secs,
            self.payload_bytes,
            self.elapsed_secs
        )?;
        writeln!(f)?;
        self.cases_table(f)?;
        writeln!(f)?;
        self.latency_tables(f)?;
        writeln!(f)?;
        self.backends_table(f)?;
        writeln!(f)?;
        if !self.held_xmin.is_empty() {
            BenchReport::interval_table(
                f,
                "held xmin (a REPEATABLE READ snapshot held in phase `held`):",
                &self.held_xmin,
            )?;
            writeln!(f)?;
        }
        if !self.soak.is_empty() {
            BenchReport::interval_table(f, "soak (a row a minute):", &self.soak)?;
            writeln!(f)?;
        }
        for c in self.cases.iter().filter(|c| c.note.is_some()) {
            writeln!(
                f,
                "note: {}: {}",
                c.name,
                c.note.as_deref().unwrap_or_default()
            )?;
        }
        for r in self.backends.iter().filter(|r| r.note.is_some()) {
            writeln!(
                f,
                "note: backend {}: {}",
                r.backend,
                r.note.as_deref().unwrap_or_default()
            )?;
        }
        let with_target = self.cases.iter().filter(|c| c.ok.is_some()).count();
        let met = self.cases.iter().filter(|c| c.ok == Some(true)).count();
        write!(f, "targets met: {met}/{with_target}")
    }
}

/// Writes an aligned ` | `-separated table.
fn table(
    f: &mut fmt::Formatter<'_>,
    header: &[&str],
    right: &[bool],
    rows: &[Vec<String>],
) -> fmt::Result {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |f: &mut fmt::Formatter<'_>, cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((cell, &w), &r)| {
                if r {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        writeln!(f, "{}", parts.join(" | ").trim_end())
    };
    line(
        f,
        &header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
    )?;
    writeln!(
        f,
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    )?;
    for row in rows {
        line(f, row)?;
    }
    Ok(())
}
