//! `xgate bench` (the real binary) against a real gateway: closed and open loop, errors counted
//! by code, rows counted for streams, a watched process's CPU and RSS reported, and clear
//! errors for bad arguments.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

fn bench(h: &Harness, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .arg("bench")
        .args(["--gateway", &h.url(), "--certs"])
        .arg(certs())
        .args([
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--connections",
            "2",
            "--json",
        ])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), v, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_a_real_gateway() {
    // The grant's rate limit far above what the load generator can send: this test is
    // about the tool, not the limits.
    let h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "rate_limit: { per_second: 50, burst: 100 }",
                "rate_limit: { per_second: 1000000, burst: 1000000 }",
            )
        }),
        ..Opts::default()
    })
    .await;
    let me = std::process::id().to_string();

    // Closed loop: every call OK, rows counted, latency percentiles ordered, our own process
    // watched (the gateway runs in this test process).
    let (ok, r, err) = bench(
        &h,
        &[
            "--as",
            "civil-affairs",
            "--concurrency",
            "4",
            "--where",
            "region_code=330106",
            "--pid",
            &me,
        ],
    );
    assert!(ok, "{err}");
    assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["requests"], r["ok"], "{r}");
    assert_eq!(r["rows"].as_u64().unwrap(), 5 * r["ok"].as_u64().unwrap());
    let l = &r["latency_us"];
    assert!(l["p50"].as_u64() <= l["p99"].as_u64() && l["p99"].as_u64() <= l["max"].as_u64());
    let p = &r["processes"][0];
    assert!(p["cpu_us"].as_u64().unwrap() > 0 && p["peak_rss_kib"].as_u64().unwrap() > 0);

    // Open loop at a fixed rate: the schedule is rate × duration sends (every 20 ms for 1 s),
    // however loaded the machine (a late send is still sent, and its latency counted from
    // its scheduled time); each one is answered.
    let (ok, r, err) = bench(&h, &["--as", "civil-affairs", "--rate", "50"]);
    assert!(ok, "{err}");
    assert_eq!(r["requests"], 50, "{r}");
    assert_eq!(r["ok"], 50, "{r}");

    // Refusals are counted by code: no token, and a department without a grant.
    let (ok, r, err) = bench(
        &h,
        &["--as", "civil-affairs", "--concurrency", "2", "--no-token"],
    );
    assert!(ok, "{err}");
    assert_eq!(r["ok"], 0);
    assert_eq!(r["errors"]["UNAUTHENTICATED"], r["requests"], "{r}");
    assert_eq!(
        r["reasons"]["UNAUTHENTICATED TOKEN_MISSING"], r["requests"],
        "refusals by reason: {r}"
    );
    let (_, r, _) = bench(&h, &["--as", "health", "--concurrency", "2"]);
    assert_eq!(r["errors"]["PERMISSION_DENIED"], r["requests"], "{r}");

    // Streams: rows counted across batches.
    let (ok, r, err) = bench(
        &h,
        &[
            "--as",
            "civil-affairs",
            "--method",
            "stream",
            "--page-size",
            "7",
            "--concurrency",
            "1",
            "--where",
            "region_code=330106",
        ],
    );
    assert!(ok, "{err}");
    // Every stream carries all of Xihu's rows, whatever the batch size.
    assert_eq!(
        r["rows"].as_u64().unwrap(),
        r["ok"].as_u64().unwrap() * xihu_rows(),
        "{r}"
    );

    // A method outside the interface, as raw bytes: UNIMPLEMENTED, counted.
    let (ok, r, err) = bench(
        &h,
        &[
            "--as",
            "civil-affairs",
            "--method",
            "raw",
            "--raw-path",
            "/xgate.v1.DataExchange/Nope",
            "--concurrency",
            "1",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(r["errors"]["UNIMPLEMENTED"], r["requests"], "{r}");

    // Bad arguments: a clear message and exit 1.
    for (args, says) in [
        (
            vec!["--as", "civil-affairs", "--method", "nope"],
            "--method `nope`",
        ),
        (
            vec!["--as", "civil-affairs", "--method", "raw"],
            "--raw-path",
        ),
        (
            vec![
                "--as",
                "civil-affairs",
                "--method",
                "raw",
                "--raw-path",
                "/a/b",
                "--raw-body-hex",
                "zz",
            ],
            "--raw-body-hex",
        ),
        (
            vec!["--as", "civil-affairs", "--rate", "0"],
            "--rate must be positive",
        ),
        (vec!["--as", "nobody"], "nobody"),
    ] {
        let (ok, _, err) = bench(&h, &args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }
}

/// Rows of the sample person table in Xihu (330106), counted from the table itself.
fn xihu_rows() -> u64 {
    let t = xgate::dev::provider::person_table(2_000);
    let region = t
        .columns
        .iter()
        .position(|c| c.name == "region_code")
        .unwrap();
    t.rows
        .iter()
        .filter(|r| text(&r.values[region]) == "330106")
        .count() as u64
}

/// `--timeout-ms`: each call carries the deadline, and one unanswered past it is counted as
/// `DEADLINE_EXCEEDED` (a provider that takes 500 ms against a 150 ms deadline: every call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_deadlines_are_sent_and_counted() {
    let h = Harness::start(Opts {
        behaviour: xgate::dev::provider::Behaviour {
            delay: std::time::Duration::from_millis(500),
            ..Default::default()
        },
        ..Opts::default()
    })
    .await;
    let (ok, r, err) = bench(
        &h,
        &[
            "--as",
            "civil-affairs",
            "--rate",
            "10",
            "--timeout-ms",
            "150",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(r["requests"], 10, "{r}");
    assert_eq!(r["errors"]["DEADLINE_EXCEEDED"], 10, "{r}");
    assert!(
        r["latency_us"]["max"].as_u64().unwrap() < 450_000,
        "no call waited for the provider: {r}"
    );
}
