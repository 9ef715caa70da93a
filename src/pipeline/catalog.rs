//! The `Catalog` service: `ListDatasets` and `DescribeDataset`, with the access section
//! computed by the same evaluation a `Query` gets.

use super::*;

/// `DescribeDataset`'s access section: the same evaluation `Query` uses, with all fields.
pub(super) fn describe_access(
    p: &Policy,
    who_dept_sys: &Authenticated,
    dataset: &str,
    purpose: &str,
) -> pb::Access {
    let (dept, sys) = (&who_dept_sys.id.dept, &who_dept_sys.id.system);
    let token_purposes = who_dept_sys.claims.purposes.as_deref();
    let granted = policy::eval::granted_purposes(p, dept, sys, dataset);
    let purpose = if !purpose.is_empty() {
        purpose.to_owned()
    } else {
        granted
            .iter()
            .find(|g| token_purposes.is_none_or(|t| t.contains(g)))
            .or(granted.first())
            .cloned()
            .or_else(|| token_purposes.and_then(|t| t.first().cloned()))
            .unwrap_or_else(|| "unspecified".to_owned())
    };
    let caller = who_dept_sys.caller();
    let ask = policy::Request {
        dataset,
        fields: &[],
        filter: &[],
        purpose: &purpose,
        now: Some(now_unix()),
    };
    match policy::evaluate(p, caller, ask) {
        Ok(permit) => pb::Access {
            allowed: true,
            readable_fields: permit
                .fields
                .iter()
                .filter(|f| f.mask.is_none())
                .map(|f| f.name.to_string())
                .collect(),
            masked_fields: permit
                .fields
                .iter()
                .filter(|f| !f.mask.is_none())
                .map(|f| pb::MaskedField {
                    field: f.name.to_string(),
                    mask: f.mask.describe(),
                })
                .collect(),
            allowed_purposes: permit.purposes.to_vec(),
            evaluated_purpose: purpose,
            row_scope: permit
                .scope
                .as_ref()
                .map_or_else(|| "all rows".to_owned(), |s| s.label.clone()),
            rate_limit: Some(pb::RateLimit {
                per_second: permit.rate_limit.per_second,
                burst: permit.rate_limit.burst,
            }),
            denial_reason: String::new(),
            denial_message: String::new(),
            deciding_rule: permit.rule.to_string(),
        },
        Err(rej) => pb::Access {
            allowed: false,
            allowed_purposes: granted,
            denial_reason: rej.reason.as_str().to_owned(),
            denial_message: rej.message,
            deciding_rule: rej.rule.unwrap_or_default(),
            evaluated_purpose: purpose,
            ..pb::Access::default()
        },
    }
}

pub(super) fn catalog_entry(ds: &policy::model::Dataset) -> pb::Dataset {
    use policy::model::Sensitivity as S;
    pb::Dataset {
        id: ds.id.clone(),
        title: ds.title.clone(),
        owner_department: ds.owner.clone(),
        share_type: match ds.share_type {
            policy::ShareType::Unconditional => pb::ShareType::Unconditional,
            policy::ShareType::Conditional => pb::ShareType::Conditional,
            policy::ShareType::None => pb::ShareType::None,
        } as i32,
        fields: ds
            .fields
            .iter()
            .map(|f| pb::FieldInfo {
                name: f.name.clone(),
                r#type: f.ty.to_pb() as i32,
                sensitivity: match f.sensitivity {
                    S::Public => pb::Sensitivity::Public,
                    S::Internal => pb::Sensitivity::Internal,
                    S::Personal => pb::Sensitivity::Personal,
                    S::Sensitive => pb::Sensitivity::Sensitive,
                } as i32,
                description: f.description.clone(),
            })
            .collect(),
        subject_key: ds.subject_key.clone(),
        description: ds.description.clone(),
    }
}

impl Gateway {
    pub(super) async fn list_inner(
        &self,
        call: &mut Call,
        req: &Request<pb::ListDatasetsRequest>,
    ) -> Result<pb::ListDatasetsResponse, Reject> {
        let who = self.authenticate(call, req).await?;
        let snap = self.snapshot();
        call.pending.rec().policy_version = snap.policy.version.clone();
        // The catalogue is public to every registered department, and to no one else.
        policy::eval::registered(&snap.policy, &who.id.dept)?;
        let rec = call.pending.rec();
        rec.decision = audit::Decision::Allow;
        rec.rule = Some("catalogue:public".into());
        let datasets: Vec<_> = snap
            .policy
            .file
            .datasets
            .iter()
            .map(catalog_entry)
            .collect();
        rec.rows = datasets.len() as u64;
        Ok(pb::ListDatasetsResponse {
            datasets,
            policy_version: snap.policy.version.to_string(),
        })
    }

    pub(super) async fn describe_inner(
        &self,
        call: &mut Call,
        req: &Request<pb::DescribeDatasetRequest>,
    ) -> Result<pb::DescribeDatasetResponse, Reject> {
        let who = self.authenticate(call, req).await?;
        let snap = self.snapshot();
        let p = &snap.policy;
        call.pending.rec().policy_version = p.version.clone();
        policy::eval::registered(p, &who.id.dept)?;
        let body = req.get_ref();
        if body.dataset.len() > MAX_NAME_BYTES || body.purpose.len() > MAX_NAME_BYTES {
            return Err(Reject::new(
                Reason::RequestInvalid,
                format!("dataset and purpose are at most {MAX_NAME_BYTES} bytes"),
            )
            .with_rule("request:shape"));
        }
        let rec = call.pending.rec();
        rec.policy_version = p.version.clone();
        rec.dataset = Some(body.dataset.clone());
        let Some(ds) = p.dataset(&body.dataset) else {
            return Err(Reject::new(
                Reason::DatasetUnknown,
                format!(
                    "dataset `{}` is not in the catalogue; see Catalog.ListDatasets",
                    body.dataset
                ),
            )
            .with_rule("catalogue"));
        };
        let access = describe_access(p, &who, &body.dataset, &body.purpose);
        rec.decision = audit::Decision::Allow;
        rec.rule = Some(access.deciding_rule.as_str().into());
        rec.purpose = Some(body.purpose.clone()).filter(|s| !s.is_empty());
        Ok(pb::DescribeDatasetResponse {
            dataset: Some(catalog_entry(ds)),
            access: Some(access),
            policy_version: p.version.to_string(),
        })
    }
}
