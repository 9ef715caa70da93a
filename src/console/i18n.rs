//! The console's words in Chinese (zh-CN, the default) and English, and dates in the
//! province's zone.
//!
//! One table: each key with its two texts. Templates read them as `t.<key>`; a key missing
//! from the table is a test failure (`every_template_key_is_in_the_table`), not an empty
//! label.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum Lang {
    #[default]
    #[serde(rename = "zh-CN")]
    Zh,
    #[serde(rename = "en")]
    En,
}

impl Lang {
    pub fn parse(s: &str) -> Option<Lang> {
        match s {
            "zh-CN" | "zh" => Some(Lang::Zh),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            Lang::Zh => "zh-CN",
            Lang::En => "en",
        }
    }
}

/// (key, zh-CN, en).
pub const WORDS: &[(&str, &str, &str)] = &[
    (
        "console",
        "数据共享网关 · 管理控制台",
        "xgate · bureau console",
    ),
    ("overview", "概览", "Overview"),
    ("catalogue", "资源目录", "Catalogue"),
    ("departments", "部门", "Departments"),
    ("department", "部门", "Department"),
    ("explain", "决策解释", "Explain"),
    ("preview", "变更预演", "Change preview"),
    ("audit", "审计查询", "Audit search"),
    ("league", "共享排行", "League table"),
    ("signout", "退出", "Sign out"),
    ("signed_in_as", "当前用户", "Signed in as"),
    ("role_bureau", "数据局", "Data bureau"),
    (
        "role_dept_admin",
        "部门数据管理员",
        "Department data administrator",
    ),
    ("role_auditor", "审计员", "Auditor"),
    ("other_lang", "English", "中文"),
    ("policy_version", "策略版本", "Policy version"),
    ("loaded_at", "加载时间", "Loaded at"),
    ("loaded_by", "触发方式", "Triggered by"),
    (
        "last_failed_reload",
        "最近一次失败的重载",
        "Last failed reload",
    ),
    ("no_failed_reload", "无失败的重载", "No failed reload"),
    ("providers", "数据提供方", "Providers"),
    ("provider", "提供方", "Provider"),
    ("endpoints", "端点", "Endpoints"),
    ("healthy", "正常", "healthy"),
    ("down", "不可用", "down"),
    ("last_hour", "最近一小时", "Last hour"),
    ("calls", "调用", "Calls"),
    ("allowed", "允许", "Allowed"),
    ("denied", "拒绝", "Denied"),
    ("rate_limited", "限流拒绝", "Rate-limited"),
    ("denials_by_reason", "按原因的拒绝", "Denials by reason"),
    ("reason", "原因", "Reason"),
    ("count", "次数", "Count"),
    ("audit_trail", "审计日志", "Audit trail"),
    ("writable", "可写", "writable"),
    (
        "not_writable",
        "不可写（调用被拒绝）",
        "not writable (calls refused)",
    ),
    ("queue", "待写队列", "Queue"),
    (
        "shipping",
        "汇集到全省库",
        "Shipping to the province database",
    ),
    (
        "not_shipping",
        "未配置（仅本地文件）",
        "not configured (local files only)",
    ),
    ("lag", "延迟", "Behind"),
    ("records", "条记录", "records"),
    ("seconds", "秒", "seconds"),
    ("search", "搜索", "Search"),
    ("dataset", "数据集", "Dataset"),
    ("datasets", "数据集", "Datasets"),
    ("owner", "所属部门", "Owner"),
    ("share_type", "共享类型", "Share type"),
    ("fields", "字段", "Fields"),
    ("field", "字段", "Field"),
    ("sensitivity", "敏感级别", "Sensitivity"),
    ("default_mask", "默认脱敏", "Default mask"),
    ("grant_holders", "授权使用方", "Grant holders"),
    ("negative_list", "负面清单", "Negative list"),
    ("none", "无", "none"),
    ("provides", "提供的数据集", "Datasets it provides"),
    ("consumes", "使用的数据集", "Datasets it consumes"),
    ("grants_in", "他人对其数据的授权", "Grants on its datasets"),
    ("grants_out", "其获得的授权", "Its own grants"),
    ("grant", "授权", "Grant"),
    ("consumer", "使用部门", "Consumer"),
    ("system", "系统", "System"),
    ("purposes", "用途", "Purposes"),
    ("purpose", "用途", "Purpose"),
    ("masks", "脱敏", "Masks"),
    ("row_scope", "行范围", "Row scope"),
    ("validity", "有效期", "Validity"),
    ("approval_ref", "审批文号", "Approval reference"),
    ("limits", "限额", "Limits"),
    ("quota_use", "今日配额用量", "Quota use today"),
    ("league_row", "排行榜中的位置", "League-table row"),
    ("decision", "决定", "Decision"),
    ("rules", "规则链", "Chain of rules"),
    ("step", "步骤", "Step"),
    ("result", "结果", "Result"),
    ("explain_go", "解释", "Explain"),
    ("allow", "允许", "allow"),
    ("deny", "拒绝", "deny"),
    (
        "fields_hint",
        "逗号分隔；留空表示全部",
        "comma-separated; empty for all",
    ),
    ("since", "起始", "Since"),
    ("until", "截止", "Until"),
    ("status", "状态", "Status"),
    (
        "subject",
        "数据主体（身份证号等）",
        "Data subject (id number etc.)",
    ),
    (
        "subject_recorded",
        "按数据主体查询本身会被记录在审计日志中。",
        "A search by data subject is itself recorded on the audit trail.",
    ),
    ("export_csv", "导出 CSV", "Export CSV"),
    ("time", "时间", "Time"),
    ("rows", "行数", "Rows"),
    ("source", "数据来源", "Source"),
    ("source_db", "全省审计库", "the province database"),
    (
        "source_dir",
        "本网关的本地日志",
        "this gateway's local trail",
    ),
    ("matches", "条匹配", "matches"),
    ("shown_first", "仅显示前", "showing the first"),
    ("candidate", "候选策略（YAML）", "Candidate policy (YAML)"),
    ("upload", "或上传文件", "or upload a file"),
    ("days", "回放天数", "Days of traffic"),
    ("preview_go", "预演", "Preview"),
    ("check_errors", "策略检查错误", "Policy check errors"),
    (
        "check_ok",
        "策略检查通过",
        "The candidate passes the policy check",
    ),
    ("changes", "变更内容", "What changes"),
    ("no_changes", "与当前策略相同", "Same as the policy serving"),
    ("impact", "对已记录流量的影响", "Impact on recorded traffic"),
    ("replayed", "回放的调用", "calls replayed"),
    ("now_refused", "将被拒绝", "Now refused"),
    ("newly_allowed", "新允许", "Newly allowed"),
    ("newly_masked", "新脱敏字段", "Fields newly masked"),
    ("newly_shown", "新显示字段", "Fields newly shown"),
    ("new_reason", "新的拒绝原因", "New reason"),
    (
        "no_impact",
        "回放的调用结果不变",
        "No replayed call changes",
    ),
    ("forbidden", "无权访问", "Not allowed"),
    (
        "forbidden_why",
        "您的角色不能使用此页面。此次访问已记录。",
        "Your role may not use this page. The attempt is recorded.",
    ),
    (
        "unauthenticated",
        "需要官员证书",
        "An officer certificate is needed",
    ),
    (
        "unauthenticated_why",
        "请使用政务 CA 签发的官员证书登录。此次访问已记录。",
        "Sign in with your officer certificate from the government CA. The attempt is recorded.",
    ),
    (
        "not_officer",
        "此证书未登记为控制台官员",
        "This certificate is not registered as a console officer",
    ),
    (
        "not_officer_idp",
        "此身份未登记为控制台官员",
        "This identity is not registered as a console officer",
    ),
    (
        "signin_with_idp",
        "使用统一身份认证登录",
        "Sign in with the province's identity provider",
    ),
    ("signin_failed", "登录未完成", "Sign-in not completed"),
    (
        "signin_state",
        "此登录不是在本浏览器中发起的，或已使用、已超时（10 分钟）。请重新登录。此次访问已记录。",
        "This sign-in was not started in this browser, was already used, or took over 10 minutes. Sign in again. The attempt is recorded.",
    ),
    (
        "signin_refused",
        "身份认证服务拒绝了此次登录。此次访问已记录。",
        "The identity provider refused this sign-in. The attempt is recorded.",
    ),
    (
        "signin_token",
        "身份认证服务返回的身份令牌未通过校验。此次访问已记录。",
        "The identity token from the identity provider failed its checks. The attempt is recorded.",
    ),
    (
        "idp_unavailable",
        "暂时无法连接身份认证服务，请稍后再试或使用官员证书登录。",
        "The identity provider cannot be reached now; try again later or sign in with your officer certificate.",
    ),
    ("signed_in", "已登录", "Signed in"),
    ("continue_why", "正在进入控制台……", "Opening the console…"),
    ("continue", "继续", "Continue"),
    ("not_found", "未找到", "Not found"),
    ("score", "得分", "Score"),
    ("period", "周期", "Period"),
    ("period_day", "按日", "by day"),
    ("period_week", "按周", "by week"),
    ("period_month", "按月", "by month"),
    ("back", "返回", "Back"),
    ("bad_request", "请求有误", "Bad request"),
    ("proposals", "待审批变更", "Proposals"),
    (
        "propose",
        "提交审批（需另一位数据局官员批准）",
        "Propose (a second bureau officer approves)",
    ),
    ("approve", "批准并生效", "Approve and apply"),
    ("withdraw", "撤回", "Withdraw"),
    ("proposed_by", "提出人", "Proposed by"),
    ("no_proposals", "没有待审批的变更", "No open proposals"),
    (
        "own_proposal",
        "您本人提出的变更须由另一位官员批准",
        "Your own proposal: another officer approves it",
    ),
    (
        "stale",
        "已过期：当前生效的策略已变化",
        "Stale: another policy is serving now",
    ),
    (
        "not_managed",
        "此部署的策略文件不由控制台管理（GitOps / ConfigMap），控制台只做预演。",
        "This deployment's policy file is not managed by the console (GitOps / ConfigMap): the console previews only.",
    ),
    (
        "too_many_proposals",
        "待审批变更过多，请先处理已有的。",
        "Too many open proposals: decide the ones there first.",
    ),
    (
        "second_officer",
        "变更须由提出人以外的另一位数据局官员批准。此次尝试已记录。",
        "A change is approved by a bureau officer other than its proposer. The attempt is recorded.",
    ),
    (
        "stale_proposal",
        "该变更基于旧版本策略提出，而当前生效的策略已不同：请重新预演并提交。",
        "The proposal was made against another policy version than the one serving: preview and propose it again.",
    ),
    (
        "write_failed",
        "策略文件写入失败（已记录），未做任何更改。",
        "The policy file could not be written (logged); nothing changed.",
    ),
    (
        "session_expired",
        "会话已失效，请刷新页面后重试。",
        "The form is stale (its session ended): reload the page and try again.",
    ),
];

/// The words of `lang`, by key.
pub fn words(lang: Lang) -> BTreeMap<&'static str, &'static str> {
    WORDS
        .iter()
        .map(|(k, zh, en)| (*k, if lang == Lang::Zh { *zh } else { *en }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `t.key` a template reads is in the table (a missing one would render as an
    /// error page under strict undefined behaviour).
    #[test]
    fn every_template_key_is_in_the_table() {
        let keys: std::collections::HashSet<&str> = WORDS.iter().map(|w| w.0).collect();
        for (name, body) in super::super::templates::TEMPLATES {
            let mut rest = *body;
            while let Some(at) = rest.find("t.") {
                let before = rest[..at].chars().last();
                rest = &rest[at + 2..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let key: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !key.is_empty() {
                    assert!(
                        keys.contains(key.as_str()),
                        "{name}: t.{key} is not in WORDS"
                    );
                }
            }
        }
    }

    #[test]
    fn keys_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (k, _, _) in WORDS {
            assert!(seen.insert(k), "{k} twice");
        }
    }
}
