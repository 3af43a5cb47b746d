//! A non-member learns nothing: every answer is the one for a conversation that does not exist.

use quip_client::{ClientError, ConversationId, ErrorBody, ErrorCode, StartAt};
use quip_tests::check::{full_history, messages};
use quip_tests::{user, within, Quip, TestServer};

fn not_found(what: &str, result: Result<impl std::fmt::Debug, ClientError>) -> ClientError {
    let error = match result {
        Ok(value) => panic!("{what}: succeeded ({value:?}), expected NOT_FOUND"),
        Err(e) => e,
    };
    assert_eq!(
        error.code(),
        Some(ErrorCode::NOT_FOUND),
        "{what}: failed with {error:?}, expected NOT_FOUND"
    );
    error
}

fn same_error(what: &str, member_less: &ClientError, missing: &ClientError) {
    match (member_less, missing) {
        (ClientError::Server(a), ClientError::Server(b)) => {
            assert_eq!(
                a, b,
                "{what}: a non-member is told something else than for a conversation that does not exist"
            );
            // SPEC 8.10: code 300, message `no such conversation`, no retry_after_ms.
            assert_eq!(
                a,
                &ErrorBody::not_found(),
                "{what}: not the NOT_FOUND of the spec"
            );
        }
        other => panic!("{what}: expected two server errors, got {other:?}"),
    }
    assert_eq!(
        member_less.to_string(),
        missing.to_string(),
        "{what}: messages differ"
    );
}

/// carol, not a member of alice and bob's conversation, cannot read, tail, post or manage it;
/// each refusal is NOT_FOUND and identical to the refusal for an id that does not exist, in
/// the SDK and in the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_member_cannot_read_tail_or_post() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let _bob_token = server.add_user("bob").await;
    let (carol_token, carol) = server.user_client("carol").await;
    let conv = within(
        "create",
        alice.create_conversation("private", &[user("bob")]),
    )
    .await
    .expect("alice creates a conversation");
    within("send", alice.send(conv, "for members only"))
        .await
        .expect("alice posts");
    let missing = ConversationId(conv.0 + 1000);

    let mut errors = Vec::new();
    for target in [conv, missing] {
        let which = if target == conv {
            "not a member"
        } else {
            "no such conversation"
        };
        let history = within("history", carol.history(target, None, 50)).await;
        let subscribe = within("subscribe", carol.subscribe(target, StartAt::Beginning)).await;
        let after = within("subscribe latest", carol.subscribe(target, StartAt::Latest)).await;
        let send = within("send", carol.send(target, "let me in")).await;
        let add = within("add", carol.add_member(target, user("carol"))).await;
        let remove = within("remove", carol.remove_member(target, user("alice"))).await;
        errors.push([
            not_found(&format!("history ({which})"), history),
            not_found(
                &format!("subscribe from the beginning ({which})"),
                subscribe,
            ),
            not_found(&format!("subscribe latest ({which})"), after),
            not_found(&format!("send ({which})"), send),
            not_found(&format!("add herself ({which})"), add),
            not_found(&format!("remove alice ({which})"), remove),
        ]);
    }
    let ops = [
        "history",
        "subscribe",
        "subscribe latest",
        "send",
        "add_member",
        "remove_member",
    ];
    for (op, (member_less, missing)) in ops.iter().zip(errors[0].iter().zip(&errors[1])) {
        same_error(op, member_less, missing);
    }

    let listed = within("list", carol.conversations())
        .await
        .expect("carol lists");
    assert!(
        listed.iter().all(|c| c.conv != conv),
        "carol's list shows alice's conversation"
    );
    let history = full_history(&alice, conv).await;
    let texts: Vec<String> = messages(&history).into_iter().map(|m| m.text).collect();
    assert_eq!(
        texts,
        ["for members only"],
        "carol changed the conversation"
    );
    assert_eq!(history.len(), 2, "carol's attempts added events");

    // The CLI says the same thing, on one stderr line, and fails.
    let quip = Quip::new(
        server.addr.to_string(),
        server.ca_path(),
        Some(&carol_token),
    )
    .await;
    for args in [
        ["history", "{}", "", ""],
        ["tail", "{}", "--after", "0"],
        ["send", "{}", "let me in", ""],
    ] {
        let mut stderrs = Vec::new();
        for target in [conv, missing] {
            let id = target.to_string();
            let args: Vec<&str> = args
                .iter()
                .map(|a| if *a == "{}" { id.as_str() } else { a })
                .filter(|a| !a.is_empty())
                .collect();
            let out = quip.run(&args).await;
            let what = format!("carol: quip {}", args.join(" "));
            assert!(!out.status.success(), "{what} succeeded: {}", out.stdout);
            assert!(out.stdout.is_empty(), "{what} printed {:?}", out.stdout);
            assert_eq!(
                out.stderr.lines().count(),
                1,
                "{what}: stderr is not one line: {:?}",
                out.stderr
            );
            assert!(
                out.stderr.contains("NOT_FOUND"),
                "{what}: stderr {:?}",
                out.stderr
            );
            stderrs.push(out.stderr);
        }
        assert_eq!(
            stderrs[0], stderrs[1],
            "quip {}: a non-member sees another error than for a missing conversation",
            args[0]
        );
    }
}
