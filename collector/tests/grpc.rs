//! The collector's gRPC port end to end, in process: enrollment, renewal, the report stream,
//! and every kind of bad peer — each time with a good client served alongside.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use driftwatch_collector::ca::unix_ms;
use driftwatch_proto::v1::{
    EnrollRequest, Heartbeat, RenewRequest, Report, ScanStatus, agent_message,
    collector_message::Msg, enrollment_client::EnrollmentClient,
};
use rcgen::KeyPair;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

fn new_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

async fn try_enroll(
    c: &TestCollector,
    token: &str,
    host_id: &str,
    csr_der: Vec<u8>,
) -> Result<(), tonic::Status> {
    c.enroll_client()
        .await
        .unwrap()
        .enroll(EnrollRequest {
            token: token.into(),
            host_id: host_id.into(),
            csr_der,
            labels: vec![],
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn report_stream_round_trip_with_duplicates_and_resync() {
    let c = TestCollector::start().await;
    let web = c.enroll("web-01").await;

    let mut s = c.stream(&web).await.unwrap();
    let w = s.hello("web-01", 42).await.unwrap();
    assert_eq!(
        (w.host_id.as_str(), w.epoch, w.last_committed_seq),
        ("web-01", 42, 0)
    );
    assert_eq!(w.heartbeat_interval_seconds, 30);
    let empty = driftwatch_proto::set::set_digest(&Default::default());
    assert_eq!(w.set_digest, empty.to_vec());

    let items = vec![file_item("/etc/passwd"), file_item("/usr/bin/su")];
    let msgs = s.report(full_report(42, 1, items.clone())).await.unwrap();
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(matches!(&msgs[0], Msg::Ack(a) if a.seq == 1));
    drop(s);

    // A reconnect learns what was committed; a resent seq is acked but not applied twice.
    let mut s = c.stream(&web).await.unwrap();
    let w = s.hello("web-01", 42).await.unwrap();
    assert_eq!(w.last_committed_seq, 1);
    assert_eq!(w.set_digest, full_report(42, 1, items.clone()).set_digest);
    let mut dup = full_report(42, 1, vec![file_item("/something/else")]);
    dup.set_digest = full_report(42, 1, items.clone()).set_digest;
    let msgs = s.report(dup).await.unwrap();
    assert!(matches!(&msgs[..], [Msg::Ack(a)] if a.seq == 1), "{msgs:?}");
    let host = c.store.host("web-01").await.unwrap().unwrap();
    assert_eq!(host.position.last_seq, 1);
    assert_eq!(
        host.position.set_digest.to_vec(),
        full_report(42, 1, items).set_digest
    );

    // A delta whose digest disagrees with the collector's set: ack, then Resync.
    let delta = Report {
        epoch: 42,
        seq: 2,
        upserts: vec![file_item("/etc/shadow")],
        set_digest: vec![9; 32],
        status: ScanStatus::Complete as i32,
        ..Default::default()
    };
    s.send(agent_message::Msg::Report(delta)).await;
    assert!(matches!(s.next().await.unwrap(), Msg::Ack(a) if a.seq == 2));
    assert!(matches!(s.next().await.unwrap(), Msg::Resync(_)));
    // The full report that follows is consistent again: a plain ack.
    let msgs = s
        .report(full_report(42, 3, vec![file_item("/etc/shadow")]))
        .await
        .unwrap();
    assert!(matches!(&msgs[..], [Msg::Ack(a)] if a.seq == 3), "{msgs:?}");

    // Later than anything a report set, so the stored value must be the heartbeat's.
    let last_scan = unix_ms(SystemTime::now()) + 60_000;
    s.send(agent_message::Msg::Heartbeat(Heartbeat {
        sent_unix_ms: unix_ms(SystemTime::now()),
        last_scan_unix_ms: last_scan,
        last_scan_status: ScanStatus::Complete as i32,
        last_seq: 1,
    }))
    .await;
    // Messages are handled in order: once this ack is back, the heartbeat was taken.
    let msgs = s.report(full_report(42, 4, vec![])).await.unwrap();
    assert!(matches!(&msgs[..], [Msg::Ack(a)] if a.seq == 4), "{msgs:?}");
    // The heartbeat was batched and written.
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.store.host("web-01").await.unwrap().unwrap().last_scan_ms != Some(last_scan) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeat never written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn enrollment_refusals_are_clear_and_recorded() {
    let c = TestCollector::start().await;
    let good = c.enroll("good").await;
    let key = new_key();

    // Reuse of a single-use token.
    let token = c.token(HOUR, 1, None).await;
    try_enroll(&c, &token, "a-1", csr(&key)).await.unwrap();
    let e = try_enroll(&c, &token, "a-2", csr(&key)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("used up"), "{e:?}");

    // Expired.
    let expired = c.token(Duration::from_millis(1), 1, None).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let e = try_enroll(&c, &expired, "a-3", csr(&key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");

    // Host pattern.
    let web_only = c.token(HOUR, 2, Some("web-*")).await;
    let e = try_enroll(&c, &web_only, "db-1", csr(&key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    try_enroll(&c, &web_only, "web-1", csr(&key)).await.unwrap();

    // Malformed and unknown tokens.
    let e = try_enroll(&c, "dwt_nonsense", "a-4", csr(&key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let unknown = driftwatch_collector::token::Token::generate(
        driftwatch_collector::token::TokenKind::Enrollment,
    )
    .unwrap();
    let e = try_enroll(&c, unknown.reveal(), "a-4", csr(&key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // A bad host id or CSR does not burn the token.
    let once = c.token(HOUR, 1, None).await;
    let e = try_enroll(&c, &once, "bad/host", csr(&key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("host id"), "{e:?}");
    let e = try_enroll(&c, &once, "a-5", b"garbage".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("csr"), "{e:?}");
    try_enroll(&c, &once, "a-5", csr(&key)).await.unwrap();

    let events = c.wait_for_security_event("enrollment-token-refused").await;
    assert!(
        events
            .iter()
            .filter(|e| e.kind == "enrollment-token-refused")
            .count()
            >= 4
    );
    assert!(events.iter().any(|e| e.kind == "enrollment-refused"));
    assert!(
        events.iter().all(|e| !e.detail.contains(&token)),
        "token leaked into an event"
    );

    good_client_still_served(&c, &good, "good", 1).await;
}

#[tokio::test]
async fn renew_gives_a_new_certificate_for_the_same_host() {
    let c = TestCollector::start().await;
    let old = c.enroll("web-02").await;
    let key = new_key();
    let resp = EnrollmentClient::new(c.channel(Some(&old)).await.unwrap())
        .renew(RenewRequest { csr_der: csr(&key) })
        .await
        .unwrap()
        .into_inner();
    let renewed = ClientCert {
        key: std::sync::Arc::new(key),
        cert: resp.certificate_der.clone().into(),
    };
    let old_id = driftwatch_collector::ca::client_identity(&old.cert).unwrap();
    let new_id = driftwatch_collector::ca::client_identity(&resp.certificate_der).unwrap();
    assert_eq!(new_id.host_id, "web-02");
    assert_ne!(new_id.serial, old_id.serial);
    good_client_still_served(&c, &renewed, "web-02", 1).await;

    // Renew without a certificate is refused.
    let e = c
        .enroll_client()
        .await
        .unwrap()
        .renew(RenewRequest {
            csr_der: csr(&new_key()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn impersonation_is_refused_and_recorded() {
    let c = TestCollector::start().await;
    let a = c.enroll("host-a").await;
    let b = c.enroll("host-b").await;
    // B holds a stream open throughout.
    let mut b_stream = c.stream(&b).await.unwrap();
    b_stream.hello("host-b", 1).await.unwrap();

    let mut s = c.stream(&a).await.unwrap();
    let e = s.hello("host-b", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let events = c.wait_for_security_event("impersonation").await;
    let ev = events.iter().find(|e| e.kind == "impersonation").unwrap();
    assert_eq!(ev.peer_host_id.as_deref(), Some("host-a"));
    assert!(ev.detail.contains("host-b"), "{ev:?}");
    // The enrollments and the refusal are in the audit log, each from its own transaction.
    let audit = c.store.audit_records(0, 100).await.unwrap();
    let enrolled = audit
        .iter()
        .find(|r| r.action == "host.enrolled" && r.target == "host-a")
        .expect("host.enrolled record");
    assert_eq!(enrolled.actor, "host:host-a");
    assert!(
        enrolled.detail.contains("\"token_id\""),
        "{}",
        enrolled.detail
    );
    let refused = audit
        .iter()
        .find(|r| r.action == "security.impersonation_refused")
        .expect("security.impersonation_refused record");
    assert_eq!(
        (refused.actor.as_str(), refused.target.as_str()),
        ("collector", "host-a")
    );
    assert!(refused.detail.contains("host-b"), "{}", refused.detail);

    let msgs = b_stream.report(full_report(1, 1, vec![])).await.unwrap();
    assert!(matches!(&msgs[..], [Msg::Ack(a)] if a.seq == 1));
}

#[tokio::test]
async fn certificate_of_another_ca_fails_the_handshake() {
    let c = TestCollector::start().await;
    let good = c.enroll("good").await;
    let other = driftwatch_collector::ca::CertificateAuthority::generate("other CA").unwrap();
    let key = new_key();
    let issued = other
        .sign_client_csr("good", &csr(&key), HOUR, SystemTime::now())
        .unwrap()
        .unwrap();
    let forged = ClientCert {
        key: std::sync::Arc::new(key),
        cert: issued.der.into(),
    };
    let before = c.stats.handshake_failures();
    let refused = match c.channel(Some(&forged)).await {
        Err(_) => true,
        // TLS 1.3: the client may finish before the server's alert arrives; the first call
        // then fails.
        Ok(ch) => AgentStream::open(ch).await.is_err(),
    };
    assert!(refused);
    wait_until(|| c.stats.handshake_failures() > before).await;
    good_client_still_served(&c, &good, "good", 1).await;
}

#[tokio::test]
async fn expired_client_certificate_fails_the_handshake() {
    let c = TestCollector::start().await;
    let good = c.enroll("good").await;
    // A certificate exactly like the collector's, but expired yesterday.
    let key = new_key();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        driftwatch_proto::host_id::to_uri("good")
            .try_into()
            .unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, c.ca.issuer()).unwrap();
    let expired = ClientCert {
        key: std::sync::Arc::new(key),
        cert: cert.der().clone(),
    };
    let before = c.stats.handshake_failures();
    let refused = match c.channel(Some(&expired)).await {
        Err(_) => true,
        Ok(ch) => AgentStream::open(ch).await.is_err(),
    };
    assert!(refused);
    wait_until(|| c.stats.handshake_failures() > before).await;
    good_client_still_served(&c, &good, "good", 1).await;
}

#[tokio::test]
async fn report_without_client_certificate_is_refused() {
    let c = TestCollector::start().await;
    let good = c.enroll("good").await;
    let ch = c.channel(None).await.unwrap();
    let e = match AgentStream::open(ch).await {
        Err(e) => e,
        Ok(mut s) => s.hello("good", 1).await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    c.wait_for_security_event("unauthenticated-report").await;
    good_client_still_served(&c, &good, "good", 1).await;
}

#[tokio::test]
async fn malformed_and_oversized_messages_get_a_clear_status() {
    let c = TestCollector::start_with(|s| {
        s.max_message_bytes = std::num::NonZeroUsize::new(64 * 1024).unwrap();
    })
    .await;
    let bad = c.enroll("bad").await;
    let good = c.enroll("good").await;
    let mut good_stream = c.stream(&good).await.unwrap();
    good_stream.hello("good", 1).await.unwrap();

    // Key that does not match the content.
    let mut s = c.stream(&bad).await.unwrap();
    s.hello("bad", 1).await.unwrap();
    let mut r = full_report(1, 1, vec![file_item("/etc/a")]);
    r.upserts[0].key = driftwatch_proto::set::file_key(b"/etc/b");
    let e = s.report(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("does not match"), "{e:?}");

    // Another epoch than the Hello's.
    let mut s = c.stream(&bad).await.unwrap();
    s.hello("bad", 1).await.unwrap();
    let e = s.report(full_report(2, 1, vec![])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("epoch"), "{e:?}");

    // Report before Hello.
    let mut s = c.stream(&bad).await.unwrap();
    s.send(agent_message::Msg::Report(full_report(1, 1, vec![])))
        .await;
    let e = s.next().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("Hello"), "{e:?}");

    // Over the message limit.
    let mut s = c.stream(&bad).await.unwrap();
    s.hello("bad", 1).await.unwrap();
    let big: Vec<_> = (0..2000)
        .map(|i| file_item(&format!("/var/lib/some/long/path/to/a/file/number/{i:08}")))
        .collect();
    let e = s.report(full_report(1, 1, big)).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
        ),
        "{e:?}"
    );
    assert!(
        e.message().contains("too large") || e.message().contains("length"),
        "{e:?}"
    );

    let msgs = good_stream.report(full_report(1, 1, vec![])).await.unwrap();
    assert!(matches!(&msgs[..], [Msg::Ack(a)] if a.seq == 1));
}

#[tokio::test]
async fn silent_streams_are_closed() {
    let c = TestCollector::start_with(|s| {
        s.tuning.hello_timeout = Duration::from_millis(300);
        s.heartbeat_interval =
            driftwatch_collector::config::NonZeroU32Seconds(std::num::NonZeroU32::new(1).unwrap());
    })
    .await;
    let quiet = c.enroll("quiet").await;
    let good = c.enroll("good").await;

    // Never says Hello.
    let started = tokio::time::Instant::now();
    let mut s = c.stream(&quiet).await.unwrap();
    let e = s.next().await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Says Hello, then nothing for 3 heartbeat intervals; a good client meanwhile keeps
    // heartbeating and is not closed.
    let mut s = c.stream(&quiet).await.unwrap();
    s.hello("quiet", 1).await.unwrap();
    let mut g = c.stream(&good).await.unwrap();
    g.hello("good", 1).await.unwrap();
    let beats = async {
        for _ in 0..8 {
            g.send(agent_message::Msg::Heartbeat(Heartbeat::default()))
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let (closed, ()) = tokio::join!(s.next(), beats);
    let e = closed.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let msgs = g.report(full_report(1, 1, vec![])).await.unwrap();
    assert!(matches!(&msgs[..], [Msg::Ack(a)] if a.seq == 1));
}

#[tokio::test]
async fn revoked_host_is_cut_off() {
    let c = TestCollector::start().await;
    let bad = c.enroll("revoked").await;
    let good = c.enroll("good").await;
    let mut s = c.stream(&bad).await.unwrap();
    s.hello("revoked", 1).await.unwrap();

    assert!(
        c.store
            .revoke_host(
                "revoked",
                unix_ms(SystemTime::now()),
                driftwatch_collector::storage::AuditEntry::new(
                    unix_ms(SystemTime::now()),
                    "local:test",
                    "host.revoked",
                    "revoked",
                    serde_json::json!({}),
                ),
            )
            .await
            .unwrap()
            >= 1
    );
    let e = s.next().await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    c.wait_for_security_event("revoked-certificate").await;

    // New streams and renewals are refused too.
    let e = match c.stream(&bad).await {
        Err(e) => e,
        Ok(mut s) => s.hello("revoked", 1).await.unwrap_err(),
    };
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = EnrollmentClient::new(c.channel(Some(&bad)).await.unwrap())
        .renew(RenewRequest {
            csr_der: csr(&new_key()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    good_client_still_served(&c, &good, "good", 1).await;
}

#[tokio::test]
async fn health_and_reflection_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let c = TestCollector::start().await;
    let ch = c.channel(None).await.unwrap();
    for service in ["driftwatch.v1.Ingest", "driftwatch.v1.Enrollment"] {
        let status = HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"driftwatch.v1.Ingest"), "{names:?}");
    assert!(names.contains(&"driftwatch.v1.Enrollment"), "{names:?}");
}

#[tokio::test]
async fn shutdown_acks_what_was_received_and_ends_streams() {
    let mut c = TestCollector::start().await;
    let web = c.enroll("web").await;
    let mut s = c.stream(&web).await.unwrap();
    s.hello("web", 1).await.unwrap();
    s.report(full_report(1, 1, vec![file_item("/etc/x")]))
        .await
        .unwrap();
    c.stop().await.unwrap();
    // The stream ends with UNAVAILABLE (come back later), not silently.
    let e = s.next().await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ),
        "{e:?}"
    );
    assert!(TcpStreamProbe::refused(c.addr).await);
}

struct TcpStreamProbe;
impl TcpStreamProbe {
    async fn refused(addr: std::net::SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_err()
    }
}

/// Waits (bounded) for a condition on shared counters.
async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
