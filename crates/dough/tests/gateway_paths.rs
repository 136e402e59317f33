//! Privileged tier (root, no VM): `dough bench gateway` drives the
//! production path — a stand-in guest namespace whose packets arrive on the
//! clone netns's `tap0`, dough's rules there, a real `dough gateway`
//! process — with HTTPS/1.1 through an SNI pass-through and a brokered
//! name, and HTTP/2 from the guest's side to a brokered name whose upstream
//! speaks HTTP/2 too, next to the `nat` baseline (the same stand-in guest
//! forwarded and masqueraded past any gateway). The run fails if any request or download comes back
//! short; the test checks what only the JSON tells.

mod common;

use common::*;

#[test]
fn gateway_passes_through_brokers_over_http2_and_counts_every_byte() {
    let home = tempfile::tempdir().unwrap();
    let out = run(
        home.path(),
        &[
            "bench",
            "gateway",
            "--requests",
            "5",
            "--megabytes",
            "2",
            "--rounds",
            "2",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for mode in ["direct", "nat", "passthrough", "brokered"] {
        assert!(
            j["modes"][mode]["request_ms_p50"].as_f64().unwrap() > 0.0,
            "{mode}: {j}"
        );
        // One download per round, each in full (the run fails otherwise).
        let each = j["modes"][mode]["download_mib_per_s_each"]
            .as_array()
            .unwrap();
        assert_eq!(each.len(), 2, "{mode}: {j}");
    }
    // The gateway spends CPU on the bytes it relays, (next to) none on
    // direct ones or on those the `nat` baseline forwards past it.
    let cpu = |mode: &str| j["modes"][mode]["gateway_cpu_ms_per_mib"].as_f64().unwrap();
    for base in ["direct", "nat"] {
        assert!(cpu(base) < cpu("passthrough"), "{base}: {j}");
        assert!(cpu(base) < cpu("brokered"), "{base}: {j}");
    }
    for m in ["passthrough", "brokered"] {
        assert!(j["throughput_vs_nat"][m].as_f64().unwrap() > 0.0, "{j}");
    }
    // Ten requests over one HTTP/2 connection from the guest's side: each
    // reached the upstream with the real key put in, over HTTP/2.
    assert_eq!(
        j["h2_brokered_answers"],
        serde_json::json!(["real HTTP/2.0"]),
        "{j}"
    );
}
