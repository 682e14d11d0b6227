//! `driftwatch export`: the fleet's events for a SIEM or a spreadsheet, from
//! `GET /api/v1/export`.
//!
//! `--format jsonl|csv|cef` streams the collector's rendering to stdout or `--out FILE`
//! unchanged (each format is already safe for a terminal: see `crate::export`); `--out` writes
//! a temporary file beside FILE and renames it only once the whole export arrived, so a cut
//! export never looks complete. The default table is for people: every host-supplied string
//! in it is display-escaped (`driftwatch_proto::escape`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

use super::client::Client;
use super::table::Table;
use super::{Format, fetch, when};
use driftwatch_proto::escape;

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Events at or after this time: RFC 3339 (2026-11-26T08:00:00Z), a date (2026-11-26), or
    /// a duration back from now (24h, 7d). Default: the last 7 days.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Events at or before this time (same forms as --since). Default: now.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only these kinds, comma-separated: violation (opened and resolved), violation_opened,
    /// violation_resolved, security, audit. Default: all.
    #[arg(long, value_name = "KINDS")]
    pub kind: Option<String>,
    /// Write the export to FILE (created or replaced once complete) instead of stdout. Needs
    /// --format jsonl, csv or cef.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

fn format_name(f: Format) -> Option<&'static str> {
    match f {
        Format::Jsonl => Some("jsonl"),
        Format::Csv => Some("csv"),
        Format::Cef => Some("cef"),
        Format::Table | Format::Json => None,
    }
}

/// Runs `driftwatch export`; returns what to print on stdout (empty when streamed).
pub async fn run(client: &Client, format: Format, args: &ExportArgs) -> anyhow::Result<String> {
    let query = |f: &str| {
        client.base().target(
            "/api/v1/export",
            &[
                ("format", Some(f.to_string())),
                ("since", args.since.clone()),
                ("until", args.until.clone()),
                ("kind", args.kind.clone()),
            ],
        )
    };
    match (format, format_name(format)) {
        (Format::Json, _) => bail!(
            "driftwatch export writes --format jsonl (one JSON object per line), csv or cef, \
             or a table for people when --format is left out"
        ),
        (_, None) => {
            if args.out.is_some() {
                bail!("--out needs --format jsonl, csv or cef");
            }
            let resp = fetch(client, &query("jsonl")).await?;
            events_table(&resp.body)
        }
        (_, Some(name)) => {
            let target = query(name);
            match &args.out {
                None => {
                    let mut stdout = std::io::stdout().lock();
                    client.get_streaming(&target, &mut stdout).await?;
                    stdout.flush().context("writing to stdout")?;
                }
                Some(path) => write_file(client, &target, path).await?,
            }
            Ok(String::new())
        }
    }
}

/// Streams into `<FILE>.partial-<pid>` beside FILE, syncs, renames over FILE.
async fn write_file(client: &Client, target: &str, path: &Path) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("--out {}: not a file name", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".partial-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let result = async {
        let bytes = client.get_streaming(target, &mut file).await?;
        file.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok::<u64, anyhow::Error>(bytes)
    }
    .await;
    match result {
        Ok(bytes) => {
            eprintln!(
                "driftwatch: wrote {bytes} bytes to {}",
                escape::bytes(path.as_os_str().as_encoded_bytes())
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The JSON Lines export as a table: time, action, severity, host, what.
fn events_table(body: &[u8]) -> anyhow::Result<String> {
    let mut t = Table::new(vec!["TIME", "ACTION", "SEVERITY", "HOST", "WHAT"]);
    let mut n = 0usize;
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value =
            serde_json::from_slice(line).context("the collector's export is not JSON Lines")?;
        let what = if let Some(p) = str_at(&v, &["file", "path"]) {
            p.to_string()
        } else if let Some(name) = str_at(&v, &["package", "name"]) {
            match str_at(&v, &["package", "version"]) {
                Some(ver) => format!("package {name} {ver}"),
                None => format!("package {name}"),
            }
        } else {
            str_at(&v, &["message"]).unwrap_or("-").to_string()
        };
        t.row(vec![
            when(str_at(&v, &["@timestamp"]).unwrap_or("-")),
            escape::text(str_at(&v, &["event", "action"]).unwrap_or("-")),
            escape::text(str_at(&v, &["driftwatch", "severity"]).unwrap_or("-")),
            escape::text(str_at(&v, &["host", "name"]).unwrap_or("-")),
            escape::text(&what),
        ]);
        n += 1;
    }
    if n == 0 {
        return Ok("no events\n".into());
    }
    Ok(t.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_escapes_what_hosts_sent() {
        let line = serde_json::json!({
            "@timestamp": "2026-11-26T08:26:56.123Z",
            "event": {"action": "violation.opened"},
            "driftwatch": {"severity": "high"},
            "host": {"name": "web\u{1b}[2J"},
            "file": {"path": "/tmp/a\nb\u{202e}c|d=e"},
        });
        let out = events_table(format!("{line}\n").as_bytes()).unwrap();
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        assert!(out.contains("web\\x1b[2J"), "{out}");
        assert!(out.contains("/tmp/a\\nb\\u{202e}c|d=e"), "{out}");
        assert_eq!(out.lines().count(), 2, "{out}");
        assert_eq!(events_table(b"").unwrap(), "no events\n");
        assert!(events_table(b"not json\n").is_err());
    }
}
