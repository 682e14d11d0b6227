//! `driftwatch api-token …` and `driftwatch enrollment-token …`: token management over the API
//! (admin role). A new token's secret is printed once, alone on stdout, so that
//! `driftwatch api-token create … > file` keeps just the token.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;
use hyper::Method;

use super::client::{Client, Response};
use super::table::Table;
use super::{EXIT_OK, Format, parse, render, when, when_opt};
use crate::api;
use driftwatch_proto::escape;

#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    /// Create an API token and print it (only this once).
    Create {
        /// auditor, operator or admin.
        #[arg(long, value_parser = ["auditor", "operator", "admin"])]
        role: String,
        /// Who or what it is for.
        #[arg(long)]
        name: String,
        /// How long it stays valid (e.g. 90d). Default: until revoked.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List API tokens (never the secrets).
    List,
    /// Revoke an API token by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum EnrollmentTokenCommand {
    /// Create an enrollment token for `driftwatch-agent enroll --token` and print it (once).
    Create {
        /// How long it stays valid (default 1h, at most 30d).
        #[arg(long)]
        ttl: Option<String>,
        /// How many hosts may enroll with it (default 1).
        #[arg(long)]
        uses: Option<u32>,
        /// Only host ids matching this glob (e.g. 'web-*').
        #[arg(long, value_name = "GLOB")]
        host_pattern: Option<String>,
    },
    /// List enrollment tokens (never the secrets).
    List,
}

async fn send(
    client: &Client,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<Response> {
    let target = client.base().target(path, &[]);
    let body = body.map(|b| b.to_string().into_bytes());
    let resp = client.send(method.clone(), &target, body).await?;
    if !resp.status.is_success() {
        bail!(
            "collector refused {method} {target}: {}",
            resp.error_message()
        );
    }
    Ok(resp)
}

fn print_secret(format: Format, resp: &Response, secret: &str, note: String) -> anyhow::Result<()> {
    match format {
        Format::Json => print!(
            "{}",
            render(format, resp, |_: serde_json::Value| String::new())?
        ),
        Format::Table => {
            eprintln!("{note}; it is shown only once:");
            println!("{secret}");
        }
    }
    Ok(())
}

pub async fn api_token(
    client: &Client,
    format: Format,
    cmd: &ApiTokenCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        ApiTokenCommand::Create { role, name, ttl } => {
            let body = serde_json::json!({ "name": name, "role": role, "ttl": ttl });
            let resp = send(client, Method::POST, "/api/v1/tokens", Some(body)).await?;
            let a: api::ApiTokenAnswer = parse(&resp)?;
            let secret = a.secret.clone().unwrap_or_default();
            let note =
                format!(
                    "API token {} ({}) {}",
                    escape::text(&a.token.id),
                    escape::text(&a.token.role),
                    a.token.expires_at.as_deref().map_or(
                        "valid until revoked".into(),
                        |e| format!("valid until {}", when(e))
                    )
                );
            print_secret(format, &resp, &secret, note)?;
        }
        ApiTokenCommand::List => {
            let resp = send(client, Method::GET, "/api/v1/tokens", None).await?;
            print!(
                "{}",
                render(format, &resp, |l: api::ApiTokenList| {
                    let mut t = Table::new(vec![
                        "ID",
                        "ROLE",
                        "STATE",
                        "EXPIRES",
                        "LAST USED",
                        "CREATED BY",
                        "NAME",
                    ]);
                    for k in &l.tokens {
                        t.row(vec![
                            escape::text(&k.id),
                            escape::text(&k.role),
                            escape::text(&k.state),
                            when_opt(&k.expires_at),
                            when_opt(&k.last_used_at),
                            escape::text(&k.created_by),
                            escape::text(&k.name),
                        ]);
                    }
                    t.render()
                })?
            );
        }
        ApiTokenCommand::Revoke { id } => {
            let path = format!("/api/v1/tokens/{}", super::percent_encode_segment(id));
            let resp = send(client, Method::DELETE, &path, None).await?;
            match format {
                Format::Json => {
                    print!(
                        "{}",
                        render(format, &resp, |_: serde_json::Value| String::new())?
                    )
                }
                Format::Table => println!("API token {} revoked", escape::text(id)),
            }
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}

pub async fn enrollment_token(
    client: &Client,
    format: Format,
    cmd: &EnrollmentTokenCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        EnrollmentTokenCommand::Create {
            ttl,
            uses,
            host_pattern,
        } => {
            let body =
                serde_json::json!({ "ttl": ttl, "uses": uses, "host_pattern": host_pattern });
            let resp = send(
                client,
                Method::POST,
                "/api/v1/enrollment-tokens",
                Some(body),
            )
            .await?;
            let a: api::EnrollmentTokenAnswer = parse(&resp)?;
            let note = format!(
                "enrollment token {} valid until {}, {} use(s)",
                escape::text(&a.token.id),
                when(&a.token.expires_at),
                a.token.uses_left
            );
            print_secret(format, &resp, &a.secret, note)?;
        }
        EnrollmentTokenCommand::List => {
            let resp = send(client, Method::GET, "/api/v1/enrollment-tokens", None).await?;
            print!(
                "{}",
                render(format, &resp, |l: api::EnrollmentTokenList| {
                    let mut t =
                        Table::new(vec!["ID", "STATE", "EXPIRES", "USES LEFT", "HOST PATTERN"]);
                    for k in &l.tokens {
                        t.row(vec![
                            escape::text(&k.id),
                            escape::text(&k.state),
                            when(&k.expires_at),
                            k.uses_left.to_string(),
                            k.host_pattern.as_deref().map_or("*".into(), escape::text),
                        ]);
                    }
                    t.render()
                })?
            );
        }
    }
    Ok(ExitCode::from(EXIT_OK))
}
