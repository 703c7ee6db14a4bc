//! The Grafana dashboard (`docs/grafana/peersync.json`) asks only for metrics a node exports: every
//! `peersync_*` name in a panel's query is a sample or family of a node's `/metrics`, which is in
//! Prometheus's text format.

mod common;

use std::collections::BTreeSet;

fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("peersync_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test]
async fn every_panel_queries_metrics_the_node_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("docs/grafana/peersync.json").unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut asked: BTreeSet<String> = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let names = names_in(expr);
            assert!(!names.is_empty(), "panel {} queries no peersync metric: {expr}", panel["title"]);
            asked.extend(names);
        }
    }
    assert!(asked.len() >= 15, "{asked:?}");
    // Two nodes with traffic between them: labelled families (bytes by protocol, lag by origin,
    // peers by role) have samples only then.
    let (a, _da) = common::start_node(|_| {}).await;
    let ah = a.handle();
    let addr = common::dial_addr(&ah).await;
    let (b, _db) = common::start_node(|c| c.net.bootstrap = vec![addr]).await;
    ah.put("r", b"k".to_vec(), b"v".to_vec()).await.unwrap();
    b.handle().put("r", b"j".to_vec(), b"v".to_vec()).await.unwrap();
    common::eventually(
        "every metric the dashboard asks for to be exported",
        std::time::Duration::from_secs(30),
        || async {
            let text = ah.metrics().render();
            let exported: BTreeSet<&str> =
                text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next()).collect();
            let missing: Vec<&String> = asked.iter().filter(|n| !exported.contains(n.as_str())).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not exported: {missing:?}"))
            }
        },
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
}
