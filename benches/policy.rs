//! Policy decision cost as the model grows, and load time of a large policy.
//!
//! `cargo bench --bench policy` prints: load+validate time for 1,000 datasets and 10,000
//! grants, and the cost of one decision with 10 vs 10,000 grants (same question asked). The
//! decision is an index lookup, so the ratio should stay near 1.

#![allow(clippy::expect_used)]

use std::{hint::black_box, time::Instant};

use xgate::policy::{Caller, Policy, Request, evaluate};

fn policy_yaml(datasets: usize, grants: usize) -> String {
    let mut y =
        String::from("defaults: { rate_limit: { per_second: 10, burst: 20 } }\ndepartments:\n");
    let depts = 200.min(grants.max(2));
    for d in 0..depts {
        y += &format!(
            "  - {{ id: d{d}, name: D{d}, level: county, region: \"33{:02}{:02}\" }}\n",
            d / 99 + 1,
            d % 99 + 1
        );
    }
    y += "providers:\n";
    for p in 0..10 {
        y += &format!("  - {{ id: p{p}, endpoint: \"https://10.0.0.{p}:8444\" }}\n");
    }
    y += "datasets:\n";
    for i in 0..datasets {
        y += &format!(
            "  - id: ds{i}\n    title: Dataset {i}\n    owner: d{}\n    provider: p{}\n    share_type: conditional\n    subject_key: f0\n    region_field: region\n    fields:\n",
            i % depts,
            i % 10
        );
        for f in 0..9 {
            let sens = ["public", "internal", "personal", "sensitive"][f % 4];
            let mask = if f % 4 == 3 {
                ", mask: { keep: { first: 3, last: 2 } }"
            } else {
                ""
            };
            y += &format!("      - {{ name: f{f}, type: string, sensitivity: {sens}{mask} }}\n");
        }
        y += "      - { name: region, type: string, sensitivity: internal }\n";
    }
    y += "grants:\n";
    for g in 0..grants {
        y += &format!(
            "  - {{ id: g{g}, consumer: d{}, dataset: ds{}, fields: [f0, f1, f2, f3, f5, region], purposes: [p{}, audit], row_scope: own-region, expires: 2040-01-01 }}\n",
            g % depts,
            g % datasets,
            g % 7
        );
    }
    y
}

/// Nanoseconds per decision for the grant g0's consumer on its dataset.
fn decision_ns(p: &Policy, iters: u32) -> f64 {
    let fields = vec!["f0".to_owned(), "f3".to_owned()];
    let caller = Caller {
        dept: "d0",
        system: "s",
        token_purposes: None,
        token_bound: false,
    };
    let req = Request {
        dataset: "ds0",
        fields: &fields,
        filter: &[],
        purpose: "audit",
        now: Some(1_800_000_000),
    };
    assert!(
        evaluate(p, caller, req).is_ok(),
        "the benchmarked decision must be an allow"
    );
    let t = Instant::now();
    for _ in 0..iters {
        black_box(evaluate(black_box(p), caller, black_box(req)).ok());
    }
    t.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: then a quick pass over
    // the same code at a small size, its checks included (the decision timed is an allow).
    let quick = !std::env::args().any(|a| a == "--bench");
    // (datasets, grants) from 10 grants to 100,000 (issue 23: decisions stay flat).
    let ladder: &[(usize, usize)] = if quick {
        &[(10, 10), (50, 500)]
    } else {
        &[(10, 10), (100, 1_000), (1_000, 10_000), (5_000, 100_000)]
    };
    let iters = if quick { 100 } else { 200_000 };
    let mut policies = Vec::new();
    for &(datasets, grants) in ladder {
        let yaml = policy_yaml(datasets, grants);
        let t = Instant::now();
        let p = Policy::from_yaml(yaml.as_bytes()).expect("valid");
        let load = t.elapsed();
        assert_eq!(p.file.grants.len(), grants, "every grant loaded");
        println!(
            "load+validate: {datasets} datasets, {grants} grants ({:.1} MiB of YAML): {:.0} ms",
            yaml.len() as f64 / 1_048_576.0,
            load.as_secs_f64() * 1e3
        );
        policies.push((grants, p));
    }
    // Interleave runs so machine noise hits every size alike; report the best of each.
    let mut best = vec![f64::MAX; policies.len()];
    for _ in 0..5 {
        for (i, (_, p)) in policies.iter().enumerate() {
            best[i] = best[i].min(decision_ns(p, iters));
        }
    }
    for ((grants, _), ns) in policies.iter().zip(&best) {
        println!(
            "decision, {grants:>7} grants: {ns:>5.0} ns  ({:.2} × 10 grants)",
            ns / best[0]
        );
    }
}
