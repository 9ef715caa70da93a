//! "Who looked at my data": which callers may ask (`usage.portals`) and which accesses a data
//! subject is told of (`usage.withhold`, `usage.never_disclose`). Pure: the facts of one
//! recorded access and the time in, a decision out. Not here: finding the accesses (the audit
//! trail, `audit::read` / `audit::db`), nor answering the call (`pipeline::usage`).

use super::{Policy, model::Disclosure};

/// The facts of one recorded access the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub consumer: &'a str,
    pub purpose: &'a str,
    pub dataset: &'a str,
}

/// Whether `dept`'s `system` may call `Usage.FindUsage`.
pub fn is_portal(p: &Policy, dept: &str, system: &str) -> bool {
    p.file
        .usage
        .portals
        .iter()
        .any(|x| x.consumer == dept && x.system.as_deref().is_none_or(|s| s == system))
}

fn covers(rule: &Disclosure, a: &Access<'_>) -> bool {
    rule.consumer.as_deref().is_none_or(|c| c == a.consumer)
        && rule.purpose.as_deref().is_none_or(|x| x == a.purpose)
        && rule.dataset.as_deref().is_none_or(|d| d == a.dataset)
}

/// Whether the data subject is told of access `a` at `now` (unix seconds): not when a
/// never-disclose rule covers it, nor while a withholding rule that covers it holds (until its
/// date, or until released).
pub fn disclosed(p: &Policy, a: &Access<'_>, now: i64) -> bool {
    let u = &p.file.usage;
    if u.never_disclose.iter().any(|r| covers(r, a)) {
        return false;
    }
    !u.withhold.iter().any(|r| {
        covers(r, a)
            && !r.released
            && match r.until.as_deref().map(super::parse_instant) {
                Some(Ok(t)) => now < t,
                // Checked at load; an unreadable date withholds (closed).
                Some(Err(_)) => true,
                None => true,
            }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn policy(usage: &str) -> Policy {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/dev/policy.yaml"
        ))
        .unwrap();
        let text = format!("{text}\nusage:\n{usage}");
        let file: super::super::model::PolicyFile = serde_yaml_ng::from_str(&text).unwrap();
        Policy::build(file, "test".into()).unwrap()
    }

    #[test]
    fn withheld_until_a_date_or_a_release_and_never_by_law() {
        let p = policy(
            "  portals: [{ consumer: civil-affairs, system: portal }]\n\
             \x20 withhold:\n\
             \x20   - { consumer: xihu-civil-affairs, purpose: temporary-relief, until: 2027-01-01, reference: case-1 }\n\
             \x20   - { dataset: market.company_registry, reference: case-2 }\n\
             \x20   - { consumer: health, released: true, reference: case-3 }\n\
             \x20 never_disclose:\n\
             \x20   - { consumer: civil-affairs, purpose: minimum-living-allowance, reference: law-1 }\n",
        );
        let at = |c, pu, d| Access {
            consumer: c,
            purpose: pu,
            dataset: d,
        };
        let before = parse("2026-12-31T00:00:00+08:00");
        let after = parse("2027-01-01T00:00:00+08:00");
        let relief = at(
            "xihu-civil-affairs",
            "temporary-relief",
            "hukou.person_basic",
        );
        assert!(!disclosed(&p, &relief, before), "withheld until its date");
        assert!(disclosed(&p, &relief, after), "disclosed from its date");
        let other = at("xihu-civil-affairs", "other", "hukou.person_basic");
        assert!(
            disclosed(&p, &other, before),
            "another purpose is not covered"
        );
        let company = at("health", "x", "market.company_registry");
        assert!(!disclosed(&p, &company, after), "until released");
        let released = at("health", "x", "hukou.person_basic");
        assert!(disclosed(&p, &released, before), "released");
        let by_law = at(
            "civil-affairs",
            "minimum-living-allowance",
            "hukou.person_basic",
        );
        assert!(!disclosed(&p, &by_law, i64::MAX), "never");
        assert!(is_portal(&p, "civil-affairs", "portal"));
        assert!(!is_portal(&p, "civil-affairs", "subsidy"));
        assert!(!is_portal(&p, "health", "portal"));
    }

    fn parse(s: &str) -> i64 {
        super::super::parse_instant(s).unwrap()
    }
}
