//! Authentication failures, in the SDK and in the CLI: clear, coded, and no panic.

use std::time::Duration;

use quip_client::{Client, ClientError, ErrorCode};
use quip_tests::{free_udp_port, within, CliOutput, Quip, TestServer};

/// The CLI failed cleanly: non-zero exit, nothing on stdout, one `quip: ...` line on stderr,
/// no panic or backtrace.
fn clean_failure<'a>(what: &str, out: &'a CliOutput) -> &'a str {
    assert!(
        !out.status.success(),
        "{what}: succeeded, printing {:?}",
        out.stdout
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: printed {:?} on stdout",
        out.stdout
    );
    let stderr = out.stderr.trim_end();
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: stderr is not one line:\n{}",
        out.stderr
    );
    assert!(stderr.starts_with("quip: "), "{what}: stderr {stderr:?}");
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "thread '"] {
        assert!(
            !out.stderr.contains(bad),
            "{what}: stderr shows {bad:?}:\n{}",
            out.stderr
        );
    }
    stderr
}

/// Wrong and malformed tokens are refused with UNAUTHENTICATED; the CLI says so on one line;
/// a daemon that does not answer, a CA that did not sign the server and a missing CA file or
/// token are clear errors too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth() {
    let server = TestServer::start().await;
    let token = server.add_user("alice").await;
    let other = server.add_user("bob").await;

    let mut flipped = token.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).expect("tokens are ASCII");
    let wrong_tokens = [
        ("another token's twin", flipped),
        (
            "a well-formed unknown token",
            format!("quip_{}", "0".repeat(64)),
        ),
        ("the token with a suffix", format!("{token}x")),
        ("the token's prefix", token[..token.len() - 1].to_owned()),
        ("an empty token", String::new()),
        ("garbage", "garbage".to_owned()),
        ("only the prefix", "quip_".to_owned()),
        ("non-ASCII", "quip_ключ🔑".to_owned()),
        ("a token with a newline", format!("{token}\n")),
    ];
    for (what, wrong) in &wrong_tokens {
        match server.try_client(wrong).await {
            Ok(client) => panic!("{what}: connected as {}", client.user()),
            Err(e) => assert_eq!(
                e.code(),
                Some(ErrorCode::UNAUTHENTICATED),
                "{what}: refused with {e:?}, expected UNAUTHENTICATED"
            ),
        }
    }
    // A token no server takes is refused by the SDK itself, before it connects (the server's
    // own refusal of one is in the daemon's hostile-peer tests).
    let huge = format!("quip_{}", "a".repeat(10_000));
    match server.try_client(&huge).await {
        Ok(client) => panic!("a huge token: connected as {}", client.user()),
        Err(e) => assert!(
            e.code().is_none() && e.to_string().contains("at most 256"),
            "a huge token: {e:?}"
        ),
    }
    // Refusals do not disturb the server: the real tokens still work.
    let alice = server.client(&token).await;
    assert_eq!(alice.user().as_str(), "alice");
    let bob = server.client(&other).await;
    assert_eq!(bob.user().as_str(), "bob");

    let quip = Quip::new(server.addr.to_string(), server.ca_path(), Some(&token)).await;
    quip.run(&["conv", "list"])
        .await
        .expect_success("quip conv list with a valid token");
    for (what, wrong) in wrong_tokens
        .iter()
        .filter(|(_, t)| !t.is_empty() && !t.contains('\n'))
    {
        let out = quip.with_token(Some(wrong)).run(&["conv", "list"]).await;
        let line = clean_failure(&format!("quip with {what}"), &out);
        assert!(
            line.contains("UNAUTHENTICATED"),
            "quip with {what}: {line:?}"
        );
    }
    let out = quip.with_token(None).run(&["conv", "list"]).await;
    let line = clean_failure("quip without a token", &out);
    assert!(line.contains("token"), "quip without a token: {line:?}");

    let missing_ca = server.dir().join("no-such-ca.pem");
    let out = Quip::new(server.addr.to_string(), &missing_ca, Some(&token))
        .await
        .run(&["conv", "list"])
        .await;
    let line = clean_failure("quip with a missing CA file", &out);
    assert!(
        line.contains("no-such-ca.pem"),
        "quip with a missing CA file: {line:?}"
    );

    // A CA that did not sign this server's certificate: the TLS handshake must fail.
    let stranger = TestServer::start().await;
    let mut config = server.client_config(&token);
    config.ca = stranger.client_config(&token).ca;
    let refused = within("connecting with a foreign CA", Client::connect(config)).await;
    assert!(
        matches!(refused, Err(ClientError::Connect { .. })),
        "a server signed by another CA was accepted or failed oddly: {refused:?}"
    );
    let out = Quip::new(server.addr.to_string(), stranger.ca_path(), Some(&token))
        .await
        .run(&["conv", "list"])
        .await;
    let line = clean_failure("quip with a foreign CA", &out);
    assert!(
        line.contains("cannot connect"),
        "quip with a foreign CA: {line:?}"
    );

    // Nobody listens on this port: a timeout, reported as such.
    let nowhere = format!("127.0.0.1:{}", free_udp_port());
    let mut config = server.client_config(&token);
    config.server = nowhere.clone();
    config.connect_timeout = Duration::from_secs(2);
    let unreachable = within("connecting to nowhere", Client::connect(config)).await;
    assert!(
        matches!(&unreachable, Err(ClientError::Connect { server, .. }) if *server == nowhere),
        "connecting to a port nobody listens on: {unreachable:?}"
    );
    let out = Quip::new(nowhere.clone(), server.ca_path(), Some(&token))
        .await
        .run(&["conv", "list"])
        .await;
    let line = clean_failure("quip with an unreachable server", &out);
    assert!(
        line.contains("cannot connect") && line.contains(&nowhere),
        "quip with an unreachable server: {line:?}"
    );
}
