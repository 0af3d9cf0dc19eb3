//! `writ entry create --template` and `--node` end to end: a server process, an agent
//! process attesting over mTLS, a template entry filled from the caller's unix
//! selectors, and `writ entry show` listing the IDs the template produced.

use std::time::{Duration, Instant};

use crate::common::{Server, api, start_agent, uid};

#[test]
fn a_template_entry_names_the_caller_and_show_lists_what_it_produced() {
    let server = Server::start();
    let (_agent, socket, agent_id) = start_agent(&server);
    let created: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "create",
        "--template",
        "spiffe://example.org/users/uid-{unix:uid}",
        "--parent-id",
        &agent_id,
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(
        created["spiffe_id_template"],
        "spiffe://example.org/users/uid-{unix:uid}"
    );
    assert_eq!(created["spiffe_id"], "spiffe://example.org/writ/template");
    let entry_id = created["id"].as_str().unwrap().to_owned();

    let expected = format!("spiffe://example.org/users/uid-{}", uid());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = api(&["api", "fetch", "x509"], &socket);
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&expected), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the template entry gave no SVID within 10 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A JWT-SVID through the agent's gRPC connection to the server carries it too.
    let out = api(
        &["api", "fetch", "jwt", "--audience", "tool-server"],
        &socket,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&expected));

    let shown = server.ok(&["entry", "show", "--entry-id", &entry_id]);
    assert!(
        shown.contains("SPIFFE ID        : spiffe://example.org/users/uid-{unix:uid} (template)"),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("Produced         : {expected} on {agent_id}")),
        "{shown}"
    );
    let json: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "show",
        "--entry-id",
        &entry_id,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["template_issues"][0]["spiffe_id"], expected.as_str());
    assert_eq!(json["template_issues"][0]["agent_id"], agent_id.as_str());
}

#[test]
fn bad_templates_and_node_aliases_from_the_command_line() {
    let server = Server::start();
    // A template that could only name Writ's own identities, naming the flag.
    let err = server.fails(&[
        "entry",
        "create",
        "--template",
        "spiffe://example.org/writ/{unix:uid}",
        "--parent-id",
        "spiffe://example.org/writ/server",
    ]);
    assert!(
        err.starts_with(
            "error: --template: spiffe://example.org/writ/{unix:uid} is in the reserved"
        ),
        "{err}"
    );
    assert!(err.contains("reserved namespace"), "{err}");
    let err = server.fails(&[
        "entry",
        "create",
        "--template",
        "spiffe://example.org/x/{unix:uid}",
        "--spiffe-id",
        "spiffe://example.org/x",
        "--selector",
        "unix:uid:1",
    ]);
    assert!(err.contains("--spiffe-id"), "{err}");
    assert_eq!(server.entry_count(), 0, "nothing stored");

    // A node alias: parent is the server, selectors are node selectors.
    let alias: serde_json::Value = serde_json::from_str(&server.ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        "spiffe://example.org/cluster/prod",
        "--selector",
        "k8s_psat:cluster:prod",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(alias["parent_id"], "spiffe://example.org/writ/server");
    let shown = server.ok(&["entry", "show", "--entry-id", alias["id"].as_str().unwrap()]);
    assert!(shown.contains("Node alias       : true"), "{shown}");
    // Entries under the alias are accepted: it holds its ID as a parent.
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/cluster/prod",
        "--selector",
        "unix:uid:1000",
    ]);
    let err = server.fails(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        "spiffe://example.org/writ/nodes",
        "--selector",
        "k8s_psat:cluster:prod",
    ]);
    assert!(err.starts_with("error: --spiffe-id: "), "{err}");
}
