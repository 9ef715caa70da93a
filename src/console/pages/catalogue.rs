//! The catalogue: datasets by owner, their fields and grant holders, the negative list (a
//! department administrator's cut: its own datasets and those it holds grants on).

use super::*;

#[derive(Deserialize, Default)]
pub struct CatalogueQuery {
    #[serde(default)]
    q: String,
}

/// The datasets a session may see in the catalogue: all for the bureau; for a department
/// administrator, its own and those it holds grants on.
pub(crate) fn visible(policy: &Policy, session: &Session, d: &Dataset) -> bool {
    match (session.officer.role, session.officer.department.as_deref()) {
        (Role::Bureau, _) => true,
        (Role::DeptAdmin, Some(own)) => {
            d.owner == own
                || policy
                    .file
                    .grants
                    .iter()
                    .any(|g| g.dataset == d.id && g.consumer == own)
        }
        _ => false,
    }
}

pub async fn catalogue(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Query(q): Query<CatalogueQuery>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let snap = gw.snapshot();
    let p = &snap.policy;
    let needle = q.q.trim().to_lowercase();
    let matches = |d: &Dataset| {
        needle.is_empty()
            || d.id.to_lowercase().contains(&needle)
            || d.title.to_lowercase().contains(&needle)
            || d.description.to_lowercase().contains(&needle)
            || d.owner.to_lowercase().contains(&needle)
            || d.fields
                .iter()
                .any(|f| f.name.to_lowercase().contains(&needle))
    };
    let mut by_owner: BTreeMap<&str, Vec<&Dataset>> = BTreeMap::new();
    for d in &p.file.datasets {
        if visible(p, &session, d) && matches(d) {
            by_owner.entry(&d.owner).or_default().push(d);
        }
    }
    let negative_for = |ds: &str| -> String {
        p.file
            .negative_list
            .iter()
            .filter(|n| n.dataset == ds)
            .map(|n| match &n.field {
                Some(f) => format!("{f}: {}", n.reason),
                None => n.reason.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let owners: Vec<Value> = by_owner
        .into_iter()
        .map(|(owner, ds)| {
            context! {
                id => owner,
                name => p.department(owner).map_or(owner.to_owned(), |d| d.name.clone()),
                datasets => ds.iter().map(|d| {
                    // Who holds grants on a dataset is its owner's (and the bureau's) to see;
                    // a consumer sees its own.
                    let sees_all = session.officer.role == Role::Bureau
                        || session.officer.department.as_deref() == Some(d.owner.as_str());
                    let holders: BTreeSet<&str> = p.file.grants.iter()
                        .filter(|g| g.dataset == d.id)
                        .filter(|g| sees_all || session.officer.department.as_deref() == Some(g.consumer.as_str()))
                        .map(|g| g.consumer.as_str()).collect();
                    context! {
                        id => d.id, title => d.title, description => d.description,
                        share_type => named(&d.share_type),
                        negative => negative_for(&d.id),
                        fields => d.fields.iter().map(|f| context! {
                            name => f.name, sensitivity => named(&f.sensitivity),
                            mask => f.mask.describe(), note => f.description,
                        }).collect::<Vec<_>>(),
                        holders => holders.into_iter().collect::<Vec<_>>(),
                    }
                }).collect::<Vec<_>>(),
            }
        })
        .collect();
    let negative: Vec<Value> = p
        .file
        .negative_list
        .iter()
        .filter(|n| {
            p.dataset(&n.dataset)
                .is_none_or(|d| visible(p, &session, d))
        })
        .map(|n| context! { dataset => n.dataset, field => n.field, reason => n.reason })
        .collect();
    let ctx = context! {
        ..base(&s, &session, "/catalogue"),
        ..context! { q => q.q, owners, negative }
    };
    render(&s, "catalogue.html", session.lang, ctx)
}
